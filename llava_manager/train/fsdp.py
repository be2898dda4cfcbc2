"""FSDP2 runs through the HF Trainer and accelerate, also on a CPU-only machine.

accelerate (1.16) turns FSDP on only for accelerator devices: `AcceleratorState` sets `DistributedType.FSDP` inside
its branch for MULTI_GPU / MULTI_XPU / ... and, for a CPU-only multi-process run (MULTI_CPU over gloo), drops the
plugin without a word, so the run would train unsharded, every rank holding the whole model. FSDP2 itself runs on
CPU (`fully_shard`'s all-gather and reduce-scatter work over gloo), so `switch_on_fsdp` puts accelerate's state where
it would be on GPUs. On GPUs nothing here runs.
"""

from __future__ import annotations

import logging

from ..errors import ManagerError

logger = logging.getLogger(__name__)


def switch_on_fsdp(accelerator, plugin_args: dict) -> None:
    """Make `accelerator` an FSDP2 accelerator with `FullyShardedDataParallelPlugin(**plugin_args)` (the Trainer's
    `args.fsdp_plugin_args`), as accelerate does for GPUs. Only for the CPU-only multi-process case."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ManagerError(
            f"FSDP was asked for but accelerate set up {state.distributed_type.value!r} without it: launch one "
            "process per device with torchrun or accelerate launch (FSDP needs a multi-process run)"
        )
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies PartialState's value whenever it is created again (AcceleratorState() anywhere)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("accelerate does not enable FSDP on CPU by itself: FSDP2 switched on for this CPU-only run")
