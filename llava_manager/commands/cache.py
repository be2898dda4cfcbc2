"""`llava-manager cache [list | clean]`: the conversion cache of `from_pretrained`, listed and cleaned."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  llava-manager cache                 # what is cached, and what a clean would remove
  llava-manager cache clean           # abandoned temporaries (kill -9), incomplete folders, other versions'
  llava-manager cache clean --all     # also every conversion (redone on the next load)
  llava-manager cache clean --dry-run

Conversions live under $LLAVA_MANAGER_CACHE (default $HF_HOME/llava_manager); the downloaded originals are in
huggingface_hub's cache (`hf cache scan`, `hf cache delete`). A live writer's temporary folder is never removed.
"""


def register(subparsers) -> None:
    from ._common import add_debug_flag

    parser = subparsers.add_parser(
        "cache",
        help="list or clean the cache of converted checkpoints",
        description="List the converted checkpoints `from_pretrained` keeps, with sizes, and clean what no load "
        "will use: temporaries of killed writers, incomplete folders, conversions by other llava-manager versions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=["list", "clean"], default="list", help="default: list")
    parser.add_argument("--cache-dir", default=None, help="the conversion cache (default: $LLAVA_MANAGER_CACHE)")
    parser.add_argument("--all", action="store_true", help="clean: also remove every conversion")
    parser.add_argument("--dry-run", action="store_true", help="clean: only say what would be removed")
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..checkpoint.cache import clean_cache, default_cache_dir, scan_cache
    from ..checkpoint.conversion import format_size
    from ..errors import CommandError

    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise CommandError(f"--cache-dir {root} is a file; give the cache folder")
    if args.action == "list":
        if args.all or args.dry_run:
            raise CommandError("--all and --dry-run go with `clean`: llava-manager cache clean --all")
        entries = scan_cache(root)
        print(f"conversion cache: {root}")
        if not entries:
            print("  (empty)")
            return 0
        for entry in entries:
            print(
                f"  {entry.kind:<13} {format_size(entry.size):>9}  {entry.source or '-'}\n  {'':<13} {'':>9}  {entry.path}"
            )
        removable = [e for e in entries if e.kind in ("abandoned", "incomplete", "other version")]
        total = sum(e.size for e in entries)
        print(
            f"{len(entries)} folder(s), {format_size(total)}; `llava-manager cache clean` frees {format_size(sum(e.size for e in removable))}"
        )
        return 0
    removed = clean_cache(root, everything=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in removed:
        print(f"{verb} {entry.kind} {entry.path} ({format_size(entry.size)})")
    print(f"{verb} {len(removed)} folder(s), {format_size(sum(e.size for e in removed))}")
    return 0
