"""Write a folder so that it appears whole or not at all: a temporary sibling, renamed into place.

Each temporary holds an owner file (pid, host, process start time) until it is renamed. A later writer of the same
folder removes the temporaries whose owner is dead (a `kill -9` leftover) at once; those of a live writer stay.
Temporaries without an owner file (older versions, or a kill in the instant before the rename) go after a day.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

STALE_TEMP_SECONDS = 24 * 3600
OWNER_FILE = ".llava_manager_writer.json"


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False):
    """Yield a fresh temporary folder next to `final`; on success rename it to `final`, on failure delete it.

    If `final` appeared meanwhile (another process converted the same checkpoint), the new copy is dropped
    and the existing one kept, unless `replace`.
    """
    final = Path(final)
    created_parents = _make_parents(final.parent)
    _remove_stale_temporaries(final)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    succeeded = False
    try:
        _write_owner(temporary)
        yield temporary
        (temporary / OWNER_FILE).unlink()
        _apply_umask(temporary)  # mkdtemp (and some writers) use owner-only modes
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            _write_owner(old)
            os.rename(final, old / final.name)
            os.rename(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(temporary, final)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
        succeeded = True
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        if not succeeded:  # a failed write leaves no empty folders behind (e.g. the cache's version folders)
            for parent in reversed(created_parents):
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell it from a later process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_owner(folder: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    (folder / OWNER_FILE).write_text(json.dumps(owner))


def _owner_is_dead(owner: dict) -> bool:
    """True only when sure: the owner ran on this host and its process is gone (or its pid now names another)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return owner.get("start") is not None and _start_time(owner["pid"]) not in (None, owner["start"])


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def leftover_temporaries(final: Path) -> list[Path]:
    """The temporaries of `final` that no live writer owns: their writer died, or (no owner file) they are old."""
    final = Path(final)
    candidates = [
        *final.parent.glob(f".{glob.escape(final.name)}.tmp-*"),
        *final.parent.glob(f".{glob.escape(final.name)}.old-*"),
    ]
    return [candidate for candidate in candidates if is_abandoned(candidate)]


def is_temporary(path: Path) -> bool:
    """A temporary folder of `atomic_directory` (`.NAME.tmp-*` or `.NAME.old-*`)."""
    return path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name)


def is_abandoned(temporary: Path) -> bool:
    """No live writer will finish `temporary`: its owner is dead, or it has no owner file and is a day old."""
    try:
        owner = json.loads((Path(temporary) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = None
    try:
        if owner is not None:
            return _owner_is_dead(owner)
        return time.time() - Path(temporary).stat().st_mtime > STALE_TEMP_SECONDS
    except OSError:  # gone meanwhile
        return False


def _remove_stale_temporaries(final: Path) -> None:
    for leftover in leftover_temporaries(final):
        shutil.rmtree(leftover, ignore_errors=True)
