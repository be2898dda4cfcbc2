"""The `llava-manager` command. Each subcommand lives in `llava_manager/commands/<name>.py`
and exposes `register(subparsers)`, which adds its parser and sets `func=run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CommandError  # noqa: F401  (re-exported: its old home)

SUBCOMMANDS = ["build", "train", "convert", "chat", "inspect", "demo", "cache"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-manager",
        description="Managers (multi-layer SigLIP fusion, arXiv 2506.11515) for Hugging Face LLaVA-OneVision.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"llava_manager.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"llava-manager {args.command}: error: {error}", file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
