"""The cache of converted checkpoints: one folder per source (Hub repo + commit + subfolder, or a local folder's
path and file fingerprint) and conversion variant, under `$LLAVA_MANAGER_CACHE` (default `$HF_HOME/llava_manager`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .files import MARKER
from .source import ResolvedSource


def default_cache_dir() -> Path:
    """`$LLAVA_MANAGER_CACHE`, else `$HF_HOME/llava_manager` (`~/.cache/huggingface/llava_manager`)."""
    from huggingface_hub import constants

    return Path(os.environ.get("LLAVA_MANAGER_CACHE") or Path(constants.HF_HOME) / "llava_manager").expanduser()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._") or "root"
    return f"{keep[:60]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cache_entry(source: ResolvedSource, root: Path, variant: str = "") -> Path:
    """Where the conversion of `source` is kept. Hub: repo/commit/subfolder. Local: path + file fingerprint.

    `variant` distinguishes conversions of the same source with other settings (e.g. another tokenizer).
    """
    from ..version import __version__

    base = Path(root) / f"v{__version__}"
    if source.repo_id is not None:
        name = _slug((source.subfolder or "") + (f"\n{variant}" if variant else ""))
        return base / "hub" / source.repo_id.replace("/", "--") / source.commit / name
    fingerprint = hashlib.sha256(f"{source.path.resolve()}\n{variant}".encode())
    for file in sorted(source.path.iterdir()):
        if file.is_file():
            stat = file.stat()
            fingerprint.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return base / "local" / f"{_slug(source.path.name)}-{fingerprint.hexdigest()[:16]}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def tokenizer_variant(tokenizer) -> str:
    """What tells conversions with another tokenizer apart (`cache_entry`'s `variant`)."""
    if tokenizer is None:
        return ""
    if isinstance(tokenizer, (str, os.PathLike)):
        local = Path(tokenizer).expanduser()
        return f"tokenizer={local.resolve() if local.exists() else tokenizer}"
    vocab = sorted(tokenizer.get_vocab().items())
    return f"tokenizer={type(tokenizer).__name__}:{hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]}"
