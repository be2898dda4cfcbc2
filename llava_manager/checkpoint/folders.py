"""Write a folder so that it appears whole or not at all: a temporary sibling, renamed into place."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

STALE_TEMP_SECONDS = 24 * 3600


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False):
    """Yield a fresh temporary folder next to `final`; on success rename it to `final`, on failure delete it.

    If `final` appeared meanwhile (another process converted the same checkpoint), the new copy is dropped
    and the existing one kept, unless `replace`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield temporary
        _apply_umask(temporary)  # mkdtemp (and some writers) use owner-only modes
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(temporary, final)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale_temporaries(final: Path) -> None:
    """Temporaries left by a killed process (never visible as an entry) are removed after a day."""
    leftovers = [
        *final.parent.glob(f".{glob.escape(final.name)}.tmp-*"),
        *final.parent.glob(f".{glob.escape(final.name)}.old-*"),
    ]
    for leftover in leftovers:
        with contextlib.suppress(OSError):
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
