"""The process a training run starts in: CPU-only DeepSpeed fixes, a one-process "distributed" environment
when no launcher set one, and a clean slate for accelerate's singletons between runs in one process."""

from __future__ import annotations

import os
import socket

# `accelerate launch --use_deepspeed` sets this for the whole process; remember whether a launcher did
_LAUNCHER_USES_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED")
# the same for FSDP (accelerate's Accelerator and TrainingArguments set these when a run uses FSDP)
_LAUNCHER_FSDP = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_deepspeed_fixes() -> None:
    """DeepSpeed on a machine without CUDA: its CPU accelerator, and no JIT-compiled shm comm op (C++, minutes to
    build, and it only speeds up CPU all-reduce). Call before DeepSpeed starts."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def prepare_environment(uses_deepspeed: bool, cpu_threads: int | None = None, uses_fsdp: bool = False) -> None:
    """CPU-only DeepSpeed fixes, and a one-process "distributed" environment when no launcher set one (DeepSpeed
    and FSDP run only in one)."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if cpu_threads is not None:  # tiny models on shared cores: more threads only wait for each other
            torch.set_num_threads(cpu_threads)
    if (uses_deepspeed or uses_fsdp) and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    if uses_deepspeed:
        cpu_deepspeed_fixes()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a previous run's ZeRO-3 config would zero.Init the model we build now
    # a previous run in this process leaves accelerate's singletons behind (e.g. "this is a DeepSpeed run");
    # start from scratch so each recipe gets exactly its own setup (an existing process group is reused)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if _LAUNCHER_USES_DEEPSPEED is None:  # accelerate's Accelerator sets it for good once DeepSpeed was used
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    for key, value in _LAUNCHER_FSDP.items():
        if value is None:
            os.environ.pop(key, None)
