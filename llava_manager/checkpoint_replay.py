"""The Managers under activation checkpointing on transformers releases that checkpoint a layer's `__call__`.

transformers >= 5.23 checkpoints a decoder layer's `forward`, so our forward pre-hooks run once, outside the
checkpointed region. Earlier 5.x releases checkpoint `__call__`: the pre-hooks run inside it, and again when the
backward recomputes the layer. By then the forward has returned and its per-forward state (a ContextVar) is gone, so
the replayed hook would add nothing: the recomputed layer would differ from the original (torch raises "A different
number of tensors was saved", or, worse, the gradients are silently wrong).

The same holds on every release when a wrapper checkpoints the layer from outside (FSDP's `activation_checkpointing`,
torch's `apply_activation_checkpointing`: the layer sits inside a `CheckpointWrapper`, which the hook cannot see).

So in every training forward with gradients, the hook pins its injection plan to the layer's input tensor; the
non-reentrant recompute calls the layer with that same tensor object and finds the plan there. The plan lives as long
as the input does (which the checkpoint keeps until the backward). Reentrant checkpointing calls
the recompute with detached copies and would backpropagate into the shared Manager features once per layer, so it is
refused with a clear error there.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import ManagerError

_PLAN_ATTRIBUTE = "_llava_manager_plan"

REENTRANT_UNSUPPORTED = (
    "activation checkpointing with use_reentrant=True: this transformers release checkpoints whole decoder layers with "
    "their hooks inside, and the Managers can only replay their injection under non-reentrant checkpointing. Enable it "
    "with gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default), or upgrade to "
    "transformers >= 5.23."
)


@functools.cache
def hooks_run_inside_checkpoint(layer_class: type) -> bool:
    """True when this layer class checkpoints `__call__` (transformers < 5.23), so its forward pre-hooks are part of
    the checkpointed region and run again in the backward."""
    for klass in layer_class.__mro__:
        if klass is nn.Module:
            return False
        if "__call__" in vars(klass):
            return True
    return False


def plan_for_layer(layer: nn.Module, hidden: torch.Tensor, plan):
    """The injection plan a decoder-layer pre-hook should use: the forward's own, or, when the backward replays a
    checkpointed layer, the one pinned to its input."""
    replay = getattr(hidden, _PLAN_ATTRIBUTE, None)
    if replay is not None:
        return replay
    if plan is None or not layer.training:
        return plan
    replayed_by_transformers = getattr(layer, "gradient_checkpointing", False) and hooks_run_inside_checkpoint(
        type(layer)
    )
    if replayed_by_transformers and plan.grad_enabled and not torch.is_grad_enabled():
        raise ManagerError(REENTRANT_UNSUPPORTED)  # the first, no-grad pass of a reentrant checkpoint
    if torch.is_grad_enabled():
        # pinned in every training forward: a checkpoint wrapper *around* the layer (FSDP's activation
        # checkpointing, torch's apply_activation_checkpointing) replays the hooks too and cannot be seen from here
        setattr(hidden, _PLAN_ATTRIBUTE, plan)
    return plan
