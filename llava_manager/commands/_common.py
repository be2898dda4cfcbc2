"""Helpers shared by the `chat`, `inspect` and `demo` subcommands."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.source import looks_like_path
from ..errors import CommandError


def add_debug_flag(parser) -> None:
    """Accept `--debug` after the subcommand too (`llava-manager chat --debug ...`)."""
    import argparse

    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors"
    )


def quiet_transformers(debug: bool) -> None:
    """Hide transformers' info logs and "Loading weights" bars (kept with --debug)."""
    if debug:
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def check_model_argument(model: str) -> None:
    """Fail fast, in one line, on a local path that does not exist (Hub ids are checked when loading)."""
    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise CommandError(f"MODEL {model!r} is a file; pass the checkpoint folder (the one holding config.json)")
    if not path.exists() and looks_like_path(model):
        raise CommandError(
            f"model folder {model!r} does not exist; pass a checkpoint folder (e.g. outputs/demo/manager after "
            "`make demo`) or a Hub repo id like LooperXX/LLaVA-OV-Manager"
        )


def load_model(model: str, subfolder: str | None, debug: bool, base: str | None = None):
    """`llava_manager.from_pretrained` (with `base`: Managers-only `model` on that base), with any failure turned
    into a one-line `CommandError`."""
    from .. import from_pretrained
    from ..errors import ManagerError

    check_model_argument(model)
    if base is not None:
        check_model_argument(base)
    try:
        return from_pretrained(model, subfolder, base_model=base)
    except ManagerError:
        raise
    except Exception as error:
        if debug:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"cannot load model {model!r}: {first}") from error
