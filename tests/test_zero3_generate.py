"""Two processes, ZeRO-3 (every weight partitioned), inference: rank 0 has an image, rank 1 has none. `generate()`
and a plain forward finish (no hang) and give what one process gives (`zero3_sync.py`). And `generate()` where the
ranks' media differ in kind: a video on one rank and an image (or nothing) on the other."""

from __future__ import annotations

import pytest
import torch
from inputs import single_image_batch, text_only_batch
from test_patch import perturb
from train_helpers import run_two_processes

from llava_manager import ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_model

RUNNER = r"""
import os, sys, torch, deepspeed
from transformers.integrations import HfDeepSpeedConfig
from inputs import single_image_batch, text_only_batch
from test_zero3_generate import build

config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
model = build()  # whole, as in the one-process reference; partitioned by deepspeed.initialize
keep = HfDeepSpeedConfig(config)  # transformers then generates with synced_gpus (ranks step together)
engine, *_ = deepspeed.initialize(model=model, config=config)
model = engine.module.eval()
assert all(p.numel() == 0 for p in model.parameters()), "not partitioned"
rank = int(os.environ["RANK"])
batch = single_image_batch() if rank == 0 else text_only_batch()
with torch.no_grad():
    logits = model(**batch).logits  # transformers encodes rank 0's image inside this forward
    tokens = model.generate(**batch, max_new_tokens=6 if rank == 0 else 3, do_sample=False)
torch.save({"logits": logits, "tokens": tokens}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
os._exit(0)  # skip interpreter teardown: a DeepSpeed / gloo thread alive there once aborted it ("terminate called")
"""


def build():
    """The model both ranks and the one-process reference use: non-zero Managers, AnyRes images."""
    model = patch_llava(tiny_model(), ManagerConfig(llm_layers=[0, 2]))
    perturb(model)
    return model


@pytest.mark.slow
def test_two_process_zero3_inference_with_an_image_less_rank(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    run_two_processes(runner, [str(tmp_path)], tmp_path, timeout=240, what="2-process ZeRO-3 generate")

    reference = build().eval()
    for rank, batch, new_tokens in ((0, single_image_batch(), 6), (1, text_only_batch(), 3)):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        with torch.no_grad():
            torch.testing.assert_close(result["logits"], reference(**batch).logits, rtol=1e-5, atol=1e-5)
            expected = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(result["tokens"], expected), rank


VIDEO_RUNNER = r"""
import os, sys, torch, deepspeed
from transformers.integrations import HfDeepSpeedConfig
import inputs
from test_zero3_generate import build

config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
model = build()
keep = HfDeepSpeedConfig(config)
engine, *_ = deepspeed.initialize(model=model, config=config)
model = engine.module.eval()
rank = int(os.environ["RANK"])
batch = getattr(inputs, sys.argv[2 + rank])()
with torch.no_grad():
    tokens = model.generate(**batch, max_new_tokens=4 + rank, do_sample=False)
torch.save({"tokens": tokens}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
os._exit(0)  # skip interpreter teardown: a DeepSpeed / gloo thread alive there once aborted it ("terminate called")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank0, rank1",
    [("video_batch", "single_image_batch"), ("single_image_batch", "video_batch"), ("video_batch", "text_only_batch")],
)
def test_two_process_zero3_generate_with_a_video_on_one_rank(tmp_path, rank0, rank1):
    """transformers encodes images, then videos, before the first step; a rank without one of them idles it at that
    point (images before its own encoding, videos after), so each rank's tokens equal one process's."""
    import inputs

    runner = tmp_path / "runner.py"
    runner.write_text(VIDEO_RUNNER)
    run_two_processes(runner, [str(tmp_path), rank0, rank1], tmp_path, timeout=240, what="2-process ZeRO-3 video")
    reference = build().eval()
    for rank, name in enumerate((rank0, rank1)):
        batch = getattr(inputs, name)()
        with torch.no_grad():
            expected = reference.generate(**batch, max_new_tokens=4 + rank, do_sample=False)
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt")["tokens"], expected), (rank, name)
