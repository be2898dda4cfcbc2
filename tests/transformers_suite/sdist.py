"""transformers' own generic model tests, taken from the sdist of the installed transformers version.

`pip download --no-deps --no-binary :all: transformers==<installed>` (about 11 MB, cached) gives the sdist, whose
`tests/` holds `test_modeling_common.py` (`ModelTesterMixin`) but not the modules it imports from `tests/generation/`
and `tests/exporters/`: an empty stand-in for each lets it import. The extracted root goes first on `PYTHONPATH`,
so that `tests` is transformers' tests package, not ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# modules test_modeling_common.py imports that the sdist does not ship: {relative path: source}
STAND_INS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}


class SuiteUnavailable(RuntimeError):
    """The sdist could not be downloaded (no network to PyPI)."""


def cache_root() -> Path:
    base = os.environ.get("LLAVA_MANAGER_SUITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llava-manager", "transformers-tests"
    )
    return Path(base)


def transformers_tests_root(version: str | None = None) -> Path:
    """A folder whose `tests/` package is transformers' (for `version`, defaults to the installed one)."""
    if version is None:
        import transformers

        version = transformers.__version__
    root = cache_root() / version
    if (root / "tests" / "test_modeling_common.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            download,
            f"transformers=={version}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise SuiteUnavailable(f"pip download of the transformers {version} sdist failed: {done.stderr[-800:]}")
        staging = Path(tempfile.mkdtemp(dir=cache_root().parent if cache_root().parent.exists() else None))
        try:
            with tarfile.open(archives[0]) as archive:
                members = [m for m in archive.getmembers() if "/tests/" in m.name and m.name.count("/") == 2]
                archive.extractall(staging, members=members, filter="data")
            (extracted,) = staging.iterdir()
            for relative, source in STAND_INS.items():
                target = extracted / "tests" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.write_text(source)
            root.parent.mkdir(parents=True, exist_ok=True)
            if not root.exists():
                os.replace(extracted, root)  # atomic: a concurrent or killed run never leaves half a folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root
