"""Run transformers' generic model tests on a tiny LLaVA-OV, vanilla and with Managers, and compare.

    python tests/transformers_suite/run.py                   # vanilla, llm, projector; lists every test lost
    python tests/transformers_suite/run.py --modes vanilla llm -k test_save_load

A test is *lost* when it passes vanilla and does not pass with Managers (fails, errors or is skipped). The exit
status is 1 when any test is lost. `tests/test_transformers_suite.py` runs the same comparison inside our suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sdist import transformers_tests_root  # noqa: E402

MODES = ("vanilla", "llm", "projector")
TEST_MODULE = "generic_llava_onevision.py"


def run_mode(mode: str, keyword: str | None = None, timeout: int = 1800) -> dict[str, str]:
    """{"Class::test": "passed" | "failed" | "skipped"} for one mode, from a pytest run in a fresh process."""
    root = transformers_tests_root()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)  # a folder without a tests/ of its own, so `tests` is transformers'
        shutil.copy(HERE / TEST_MODULE, work / TEST_MODULE)
        report = work / "report.xml"
        env = {
            **os.environ,
            "LLAVA_MANAGER_SUITE_MODE": mode,
            "PYTHONPATH": os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        command = [
            sys.executable,
            "-m",
            "pytest",
            TEST_MODULE,
            "-q",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            "-o",
            "addopts=",
            "-W",
            "ignore",
            f"--junitxml={report}",
            "--rootdir",
            str(work),
        ]
        if keyword:
            command += ["-k", keyword]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        if not report.exists():
            raise RuntimeError(
                f"the {mode} run produced no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
                f"\n{done.stderr[-3000:]}"
            )
        return parse_report(report)


def parse_report(path: Path) -> dict[str, str]:
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        children = {child.tag for child in case}
        if children & {"failure", "error"}:
            outcomes[name] = "failed"
        elif "skipped" in children:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def lost(vanilla: dict[str, str], patched: dict[str, str]) -> list[str]:
    """Tests that pass vanilla and not with Managers."""
    return sorted(name for name, outcome in vanilla.items() if outcome == "passed" and patched.get(name) != "passed")


def summary(outcomes: dict[str, str]) -> dict[str, dict[str, int]]:
    """{test class: {outcome: count}}"""
    table: dict[str, dict[str, int]] = {}
    for name, outcome in outcomes.items():
        counts = table.setdefault(name.split("::")[0], {"passed": 0, "failed": 0, "skipped": 0})
        counts[outcome] += 1
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to run a subset")
    args = parser.parse_args(argv)
    results = {mode: run_mode(mode, args.keyword) for mode in args.modes}
    for mode, outcomes in results.items():
        for test_class, counts in sorted(summary(outcomes).items()):
            print(f"{mode:10s} {test_class}: {counts}")
    status = 0
    if "vanilla" in results:
        for mode in results:
            if mode != "vanilla":
                gone = lost(results["vanilla"], results[mode])
                print(f"{mode}: {len(gone)} tests lost" + "".join(f"\n  {name}" for name in gone))
                status |= bool(gone)
    return status


if __name__ == "__main__":
    sys.exit(main())
