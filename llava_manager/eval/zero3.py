"""Evaluation with the model's weights partitioned by DeepSpeed ZeRO-3 across the processes (`zero3=true`): for
models that do not fit one device. lmms-eval still shards the documents by rank; each forward gathers the weights
from every rank, so all ranks must run the same forwards:

- `generate()` steps together (transformers' `synced_gpus`, on while the ZeRO-3 config below is alive);
- a rank without images (or videos) runs that path on a blank one where the others encode theirs
  (`zero3_sync.py`);
- a rank with fewer documents (lmms-eval's shards can differ by one) runs idle calls until it has made as many as
  the busiest rank: the ranks agree on that number before the first call (`most_calls`), because once calls start,
  every collective must pair with the same collective on the other ranks.

Scored (loglikelihood) video requests are refused with several processes: they run plain forwards, in which ranks
with videos next to ranks without are not kept in step (`generate()` is).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def zero3_config(dtype: torch.dtype) -> dict:
    """A ZeRO-3 inference config: weights partitioned, no optimizer; fp16 / bf16 as the model's dtype."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def start(dtype: torch.dtype):
    """Start DeepSpeed's communication (on the launcher's process group) and return the `HfDeepSpeedConfig` that makes
    transformers load partitioned and generate with `synced_gpus`. Keep it referenced: transformers holds it weakly."""
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from ..train.environment import cpu_deepspeed_fixes

    cpu_deepspeed_fixes()
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else backend)
    return HfDeepSpeedConfig(zero3_config(dtype))


def partition(model, config) -> torch.nn.Module:
    """DeepSpeed's engine around `model` (loaded partitioned already: this adds the hooks that gather each module's
    weights for its forward); returns the module to call."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config.config)
    return engine.module.eval()


def most_calls(calls: int, device: torch.device) -> int:
    """The largest number of model calls any rank will make (a collective: call it on every rank before any model
    call)."""
    import torch.distributed as dist

    most = torch.tensor([calls], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def catch_up(calls: int, most: int, idle: Callable[[], None]) -> int:
    """After this rank's `calls` model calls, run `idle()` until it has made `most`; returns how many it ran."""
    for _ in range(most - calls):
        idle()
    return max(most - calls, 0)
