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
    assert "deprecated" not in (done.stdout + done.stderr).lower(), done.stderr[-3000:]  # e.g. past_key_values=
    return done.stdout, json.loads(out.read_text())


def test_tiny_preset_reports_every_ratio(tmp_path):
    stdout, report = _run(tmp_path, "--repeats", "2", "--train-repeats", "1", "--warmup", "0", "--decode-steps", "2")
    assert [r["image_mode"] for r in report["results"]] == ["square", "anyres", "anyres_max_9"]
    for result in report["results"]:
        for kind, phases in (
            ("median_s", "prefill decode train"),
            ("peak_bytes", "prefill decode train"),
            ("flops", "prefill train"),
        ):
            ratios = result["ratios"][kind]
            assert sorted(ratios) == sorted(phases.split()), (kind, ratios)
            assert all(math.isfinite(value) and value > 0 for value in ratios.values()), (kind, ratios)
        assert result["ratios"]["flops"]["prefill"] > 1.0  # the Managers' projector work is really there
        assert [len(result["times_s"][p]["patched"]) for p in ("prefill", "decode", "train")] == [2, 2, 1]
    assert "prefill (s)" in stdout and "peak mem train (MiB)" in stdout
    # the CPU default: train steps with activation checkpointing (as the recipes train), in lockstep like prefill
    assert report["meta"]["gradient_checkpointing"] is True and report["meta"]["interleave"] == "layer"


@pytest.mark.parametrize("injection", ["projector"])
def test_projector_injection_and_phase_selection(tmp_path, injection):
    _, report = _run(
        tmp_path,
        "--injection",
        injection,
        "--images",
        "anyres",
        "--phases",
        "prefill",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--no-memory",
        "--no-flops",
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
        tmp_path,
        "--images",
        "square",
        "--phases",
        "decode",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--decode-steps",
        "1",
        "--no-memory",
        "--no-flops",
        *flags,
    )
    steady = "glibc.malloc.mmap_threshold" in report["meta"]["malloc"]
    assert steady is not system_malloc, report["meta"]["malloc"]
    assert len(report["results"][0]["paired_range"]["decode"]) == 2


def test_auto_interleave_without_checkpointing_times_whole_train_steps(tmp_path):
    _, report = _run(
        tmp_path,
        "--images",
        "square",
        "--phases",
        "train",
        "--train-repeats",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--no-flops",
        "--no-gradient-checkpointing",
    )
    assert (
        report["meta"]["interleave"] == "layer (prefill), run (train)"
    )  # lockstep train would hold two steps' activations
    assert len(report["results"][0]["times_s"]["train"]["patched"]) == 1


def test_run_interleave_mode_still_reports(tmp_path):
    _, report = _run(
        tmp_path,
        "--interleave",
        "run",
        "--images",
        "square",
        "--phases",
        "prefill,train",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--no-flops",
        "--no-gradient-checkpointing",
    )
    assert report["meta"]["interleave"] == "run" and report["meta"]["gradient_checkpointing"] is False
    assert len(report["results"][0]["times_s"]["train"]["vanilla"]) == 1


def _lockstep():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import lockstep
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return lockstep


def test_lockstep_alternates_layer_by_layer_in_forward_and_backward():
    import torch

    from llava_manager.testing.tiny import tiny_model

    lockstep = _lockstep()
    models = [tiny_model(), tiny_model()]
    points = len(lockstep.yield_points(models[0]))
    events = []
    for side, model in enumerate(models):
        for index, module in enumerate(lockstep.yield_points(model)):
            module.register_forward_hook(lambda m, a, o, side=side, index=index: events.append((side, "fwd", index)))
    ids = torch.tensor([[1, 2, 3, 4]])

    def train(model):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()

    seconds, handovers = lockstep.run_lockstep([lambda: train(models[0]), lambda: train(models[1])], models, first=1)
    assert all(value > 0 for value in seconds)
    # the text-only forward passes every decoder layer and the LM head (not the vision tower); backward as many again
    text_points = points - len(models[0].model.vision_tower.encoder.layers)
    assert handovers == 2 * text_points
    # forward: each layer runs on side 1 (which started), then on side 0, and so on layer after layer
    assert [side for side, _, _ in events] == [1, 0] * text_points
    assert [index for _, _, index in events[::2]] == [index for _, _, index in events[1::2]]
    assert all(p.grad is not None for p in models[0].model.language_model.layers[0].parameters())


def test_lockstep_reraises_a_side_error_and_removes_its_hooks():
    import torch

    from llava_manager.testing.tiny import tiny_model

    lockstep = _lockstep()
    models = [tiny_model(), tiny_model()]
    hooks_before = [len(m.lm_head._forward_pre_hooks) for m in models]

    def fail():
        raise RuntimeError("side 1 broke")

    with pytest.raises(RuntimeError, match="side 1 broke"):
        lockstep.run_lockstep([lambda: models[0](input_ids=torch.tensor([[1, 2]])), fail], models)
    assert [len(m.lm_head._forward_pre_hooks) for m in models] == hooks_before


def test_video_modes_report_every_ratio(tmp_path):
    """`--images video` = one video of 8 and one of 32 frames; the token count is the model's (F * 2 * 2 + 1 for the
    tiny 4 x 4 patch grid pooled to 2 x 2)."""
    stdout, report = _run(
        tmp_path, "--images", "video", "--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--no-memory"
    )
    assert [r["image_mode"] for r in report["results"]] == ["video8", "video32"]
    for result, frames in zip(report["results"], (8, 32)):
        assert result["crops"] == frames and result["image_tokens"] == frames * 4 + 1
        assert sorted(result["ratios"]["median_s"]) == ["decode", "prefill", "train"]
        assert result["ratios"]["flops"]["prefill"] > 1.0  # the Managers' per-frame work is really there
    assert "8 frames, 33 tok" in stdout
