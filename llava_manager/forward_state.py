"""Per-forward state of a patched model, kept in a ContextVar so that concurrent forwards never share it.

One `ForwardState` exists while `LlavaOnevisionModel.forward` runs: the inputs the hooks need, the image features
computed in this forward, and the injection plan. It lives in a `ContextVar`, so each thread (and each asyncio task)
running the same model sees only its own; nothing of a batch stays referenced once its forward has returned.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class ForwardState:
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    mm_encoder_outputs: dict | None
    cache: object | None  # the KV cache given to this forward, if any
    image_output: object | None = None  # features.ManagerImageOutput computed inside this forward
    video_output: object | None = None  # video.ManagerVideoOutput computed inside this forward
    plan: object | None = None  # injection.InjectionPlan, built before the first decoder layer
    outer: ForwardState | None = None  # the state this forward's exit restores (None: no forward was running)


class ForwardScope:
    """Opens a `ForwardState` when the `LlavaOnevisionModel`'s forward starts and closes it when it ends (also on
    errors). `current()` is the state of the forward running in the caller's thread, or None."""

    def __init__(self, llava_model):
        self._state: ContextVar[ForwardState | None] = ContextVar("llava_manager_forward", default=None)
        self._handles = []
        try:
            self._handles.append(llava_model.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(llava_model.register_forward_hook(self._exit, always_call=True))
        except BaseException:
            self.remove()
            raise

    def current(self) -> ForwardState | None:
        return self._state.get()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, module, args, kwargs):
        self._state.set(
            ForwardState(
                input_ids=kwargs.get("input_ids", args[0] if args else None),
                inputs_embeds=kwargs.get("inputs_embeds"),
                attention_mask=kwargs.get("attention_mask"),
                mm_encoder_outputs=kwargs.get("mm_encoder_outputs"),
                cache=_cache_argument(kwargs),
                outer=self._state.get(),
            )
        )

    def _exit(self, module, args, output):
        state = self._state.get()
        if state is not None:
            self._state.set(state.outer)  # set, not reset(token): never fails, whatever context the hook runs in


def _cache_argument(kwargs: dict):
    """The KV cache a forward was called with: `cache=` (transformers >= 5.24) or `past_key_values=` (before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
