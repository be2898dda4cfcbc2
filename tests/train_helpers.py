"""Helpers for the tests/test_train_*.py files: synthetic data in tmp dirs and small tiny_cpu recipes."""

from __future__ import annotations

import json
from pathlib import Path

from llava_manager.testing.synthetic import draw_shape, write_shapes_dataset
from llava_manager.train.recipe import load_recipe


def shapes_data(folder: Path, n: int = 12, kinds=("single", "multi", "text"), seed: int = 0) -> tuple[Path, Path]:
    """(data.json, image folder) with `n` samples cycling through `kinds`."""
    data = write_shapes_dataset(folder, n, seed=seed, kinds=tuple(kinds))
    return data, folder / "images"


def write_records(folder: Path, records: list[dict], name: str = "data.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def image_file(folder: Path, name: str, shape="circle", color="red", size=(64, 48)) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    draw_shape(shape, color, size).save(folder / name)
    return name


def tiny_recipe(tmp_path: Path, *overrides: str, n: int = 12, kinds=("single", "multi", "text")):
    """The shipped tiny_cpu recipe on `n` synthetic samples in tmp_path, short and without checkpoints."""
    data, images = shapes_data(tmp_path / "data", n, kinds)
    base = [
        "--output_dir",
        str(tmp_path / "out"),
        "--data_path",
        str(data),
        "--image_folder",
        str(images),
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--save_steps",
        "0",
        "--per_device_train_batch_size",
        "2",
        "--deepspeed",
        "null",
    ]
    return load_recipe("tiny_cpu", base + list(overrides))


def save_checkpoint(model, folder: Path) -> Path:
    """`model` and its tiny processor saved in HF format in `folder` (a base a recipe can start from)."""
    from llava_manager.testing.tiny import tiny_processor

    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder


def from_checkpoint(folder: Path) -> tuple[str, ...]:
    """Recipe overrides that start from the checkpoint in `folder` instead of tiny_cpu's random model."""
    return ("--model_config", "null", "--model_name_or_path", str(folder), "--processor", "null")


def keep_torch_threads():
    """Generator for an autouse fixture: training sets torch threads (recipe cpu_threads); restore them."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ZeRO-3 with a persistence threshold of 0, so even the tiny model's parameters are really partitioned
ZERO3_PARTITIONED = ["--deepspeed", "zero3", "--deepspeed.zero_optimization.stage3_param_persistence_threshold", "0"]


def eval_logits(module, batch):
    import torch

    module.eval()
    with torch.no_grad():
        return module(**batch).logits


def reload_trained(folder):
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import llava_manager  # noqa: F401  (registers the patched model type)

    unset_hf_deepspeed_config()  # otherwise from_pretrained would zero.Init (partition) the reloaded model
    try:
        from llava_manager import from_pretrained

        model, _ = from_pretrained(str(folder))
    except ImportError:
        model = AutoModelForImageTextToText.from_pretrained(str(folder))
    return model.eval()


def run_two_processes(
    script: Path, args: list[str], cwd: Path, timeout: int = 180, what: str = "2-process run"
) -> str:
    """`torchrun --standalone --nproc_per_node 2 script args...` on CPU (gloo, one thread each), with the repo and
    tests/ importable; fails the test on a non-zero exit or a hang (both workers killed after `timeout` s)."""
    import os
    import signal
    import subprocess
    import sys

    import pytest

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")
    }
    path = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    process = subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = process.communicate()
        pytest.fail(f"{what} hung (killed after {timeout} s):\n{output[-4000:]}")
    if process.returncode != 0:  # the first errors of each rank, then the end (torchrun's summary)
        errors = [line for line in output.splitlines() if "Error" in line or "terminate" in line or "what()" in line]
        pytest.fail(f"{what} failed:\n" + "\n".join(errors[:40]) + "\n...\n" + output[-3000:])
    return output
