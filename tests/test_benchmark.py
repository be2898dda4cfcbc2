"""benchmarks/overhead.py runs end to end on the tiny preset (so it cannot rot). No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def _run(tmp_path, *args):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--threads", "1", "--json", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_tiny_preset_reports_every_ratio(tmp_path):
    stdout, report = _run(tmp_path, "--repeats", "2", "--train-repeats", "1", "--warmup", "0", "--decode-steps", "2")
    assert [r["image_mode"] for r in report["results"]] == ["square", "anyres", "anyres_max_9"]
    for result in report["results"]:
        for kind, phases in (("median_s", "prefill decode train"), ("peak_bytes", "prefill decode train"), ("flops", "prefill train")):
            ratios = result["ratios"][kind]
            assert sorted(ratios) == sorted(phases.split()), (kind, ratios)
            assert all(math.isfinite(value) and value > 0 for value in ratios.values()), (kind, ratios)
        assert result["ratios"]["flops"]["prefill"] > 1.0  # the Managers' projector work is really there
        assert [len(result["times_s"][p]["patched"]) for p in ("prefill", "decode", "train")] == [2, 2, 1]
    assert "prefill (s)" in stdout and "peak mem train (MiB)" in stdout


@pytest.mark.parametrize("injection", ["projector"])
def test_projector_injection_and_phase_selection(tmp_path, injection):
    _, report = _run(
        tmp_path, "--injection", injection, "--images", "anyres", "--phases", "prefill",
        "--repeats", "2", "--warmup", "1", "--no-memory", "--no-flops",
    )
    (result,) = report["results"]
    assert report["meta"]["injection"] == injection
    assert list(result["median_s"]) == ["prefill"] and len(result["times_s"]["prefill"]["patched"]) == 2


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc malloc tunables")
@pytest.mark.parametrize("system_malloc", [False, True], ids=["steady-malloc", "system-malloc"])
def test_cpu_run_restarts_with_steady_malloc(tmp_path, monkeypatch, system_malloc):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    flags = ["--system-malloc"] if system_malloc else []
    _, report = _run(
        tmp_path, "--images", "square", "--phases", "decode", "--repeats", "1", "--warmup", "0",
        "--decode-steps", "1", "--no-memory", "--no-flops", *flags,
    )
    steady = "glibc.malloc.mmap_threshold" in report["meta"]["malloc"]
    assert steady is not system_malloc, report["meta"]["malloc"]
    assert len(report["results"][0]["paired_range"]["decode"]) == 2
