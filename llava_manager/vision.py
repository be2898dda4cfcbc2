"""Capture of selected SigLIP hidden states with forward hooks that idle outside our calls.

Entry `j` of SigLIP's `hidden_states` tuple is the output of encoder layer `j` (entry 0: the
embeddings). Hooks are installed once and only record while `capture()` is active, so the
vision tower behaves exactly as before everywhere else and nothing keeps unselected layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .errors import ManagerError


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """SigLIP's encoder layers (`vision_tower.encoder.layers` in transformers >= 5.6)."""
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None)
        if encoder is not None and isinstance(getattr(encoder, "layers", None), nn.ModuleList):
            return encoder.layers
    raise ManagerError(f"cannot find the encoder layers of the vision tower {type(vision_tower).__name__}")


def _embeddings(vision_tower: nn.Module) -> nn.Module:
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        if owner is not None and getattr(owner, "embeddings", None) is not None:
            return owner.embeddings
    raise ManagerError(f"cannot find the embeddings of the vision tower {type(vision_tower).__name__}")


class VisionCapture:
    """Records hidden-state entries `entries` of a SigLIP tower while `capture()` is active."""

    def __init__(self, vision_tower: nn.Module, entries: list[int]):
        self.entries = sorted(set(entries))
        self._store: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("llava_manager_capture", default=None)
        layers = encoder_layers(vision_tower)
        self._handles = []
        try:  # a failure part-way removes the hooks already installed
            for entry in self.entries:
                module = _embeddings(vision_tower) if entry == 0 else layers[entry - 1]
                self._handles.append(module.register_forward_hook(self._make_hook(entry)))
        except BaseException:
            self.remove()
            raise

    def _make_hook(self, entry: int):
        def hook(module, args, output):
            store = self._store.get()
            if store is not None:
                store[entry] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @contextmanager
    def capture(self):
        """`with capture.capture() as store:` -> store[entry] is `(crops, tokens, width)` after the tower ran."""
        store: dict[int, torch.Tensor] = {}
        token = self._store.set(store)
        try:
            yield store
        finally:
            self._store.reset(token)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
