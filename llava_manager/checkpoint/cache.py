"""The cache of converted checkpoints: one folder per source (Hub repo + commit + subfolder, or a local folder's
path and file fingerprint) and conversion variant, under `$LLAVA_MANAGER_CACHE` (default `$HF_HOME/llava_manager`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
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


# ---- listing and cleaning (`llava-manager cache`) ------------------------------------------------------------
@dataclass
class CacheEntry:
    """One folder of the conversion cache."""

    path: Path
    kind: str  # "converted", "other version" (written by another llava-manager: never read), "abandoned" (a dead
    #            writer's temporary), "in progress" (a live writer's), "incomplete" (no marker: not usable)
    size: int
    source: str = ""


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def scan_cache(root: Path | None = None) -> list[CacheEntry]:
    """Every conversion in the cache under `root` (default `default_cache_dir()`) and every leftover, sorted."""
    from ..version import __version__
    from .folders import is_abandoned, is_temporary

    root = Path(root) if root is not None else default_cache_dir()
    if not root.is_dir():
        return []
    entries = []
    for version_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if version_dir.name != f"v{__version__}":
            entries.append(CacheEntry(version_dir, "other version", _size(version_dir), version_dir.name))
            continue
        for folder in sorted(p for p in version_dir.rglob("*") if p.is_dir()):
            if any(is_temporary(parent) for parent in folder.parents) or any(
                entry.path in folder.parents for entry in entries
            ):
                continue  # inside a temporary or an entry already listed
            if is_temporary(folder):
                kind = "abandoned" if is_abandoned(folder) else "in progress"
                entries.append(CacheEntry(folder, kind, _size(folder)))
            elif (folder / MARKER).is_file():
                marker = json.loads((folder / MARKER).read_text())
                source = marker.get("source", "") + (f" [{marker['subfolder']}]" if marker.get("subfolder") else "")
                entries.append(CacheEntry(folder, "converted", _size(folder), source))
            elif any(p.is_file() for p in folder.iterdir()):
                entries.append(CacheEntry(folder, "incomplete", _size(folder)))
    return entries


def clean_cache(root: Path | None = None, *, everything: bool = False, dry_run: bool = False) -> list[CacheEntry]:
    """Remove what no load will use (abandoned temporaries, incomplete folders, other versions' conversions),
    with `everything` also the conversions (they are redone on the next load); then empty folders. Live
    writers' temporaries are never touched. Returns what was (or, with `dry_run`, would be) removed."""
    root = Path(root) if root is not None else default_cache_dir()
    removable = {"abandoned", "incomplete", "other version"} | ({"converted"} if everything else set())
    entries = scan_cache(root)
    chosen = [entry for entry in entries if entry.kind in removable]
    if not dry_run:
        in_progress = {entry.path for entry in entries if entry.kind == "in progress"}
        for entry in chosen:
            shutil.rmtree(entry.path, ignore_errors=True)
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if folder not in in_progress:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only empty ones
    return chosen
