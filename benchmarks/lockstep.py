"""Time two models' steps in lockstep: alternating slices of one layer each, so a noisy machine slows both alike.

On a shared VM the machine's speed drifts by 10-30% over seconds (neighbours on the host; per core), so two
18-second prefills run one after the other can differ by 10% with identical work. Here each model runs its step
in its own Python thread, but only one thread runs at a time: at every yield point (each vision encoder layer,
each decoder layer and the LM head, in the forward and, for a training step, in the backward) the running side
stops its clock and hands the turn to the other. Each side's time is the sum of its own slices, a few hundred
milliseconds apart from the other side's, so drifts slower than that cancel in the ratio.

Only for CPU steps: the slices are timed on the host clock without device synchronisation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from llava_manager.vision import encoder_layers


def yield_points(model: nn.Module) -> list[nn.Module]:
    """The modules at whose start a side hands over: vision encoder layers, decoder layers, the LM head."""
    inner = model.model
    points = list(encoder_layers(inner.vision_tower)) + list(inner.language_model.layers)
    if getattr(model, "lm_head", None) is not None:
        points.append(model.lm_head)
    return points


class _Turns:
    """Whose turn it is, shared by the two sides."""

    def __init__(self, first: int):
        self.condition = threading.Condition()
        self.turn = first
        self.done = [False, False]


class _Side:
    """One model's step, run in its own thread, handing over at every yield point."""

    def __init__(self, index: int, turns: _Turns, step: Callable[[], object], model: nn.Module, threads: int | None):
        self.index, self.turns, self.step, self.threads = index, turns, step, threads
        self.seconds = 0.0
        self.handovers = 0
        self.error: BaseException | None = None
        self._resumed = 0.0
        self._handles = []
        for module in yield_points(model):
            self._handles.append(module.register_forward_pre_hook(lambda module, args: self.hand_over()))
            self._handles.append(module.register_forward_hook(self._hand_over_in_backward))

    def _hand_over_in_backward(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: self.hand_over())  # runs as this module's backward starts

    def hand_over(self) -> None:
        """Stop this side's clock, let the other side run its next slice, resume when it hands back."""
        self.seconds += time.perf_counter() - self._resumed
        turns, other = self.turns, 1 - self.index
        with turns.condition:
            if not turns.done[other]:
                turns.turn = other
                turns.condition.notify_all()
                turns.condition.wait_for(lambda: turns.turn == self.index)
        self.handovers += 1
        self._resumed = time.perf_counter()

    def run(self) -> None:
        turns = self.turns
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread with OpenMP
        with turns.condition:
            turns.condition.wait_for(lambda: turns.turn == self.index)
        self._resumed = time.perf_counter()
        try:
            self.step()
        except BaseException as error:  # re-raised by run_lockstep in the calling thread
            self.error = error
        finally:
            self.seconds += time.perf_counter() - self._resumed
            with turns.condition:
                turns.done[self.index] = True
                turns.turn = 1 - self.index
                turns.condition.notify_all()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def run_lockstep(
    steps: list[Callable[[], object]], models: list[nn.Module], *, first: int = 0, threads: int | None = None
):
    """Run `steps[0]` (on `models[0]`) and `steps[1]` (on `models[1]`) in alternating slices.

    Returns `([seconds of side 0, seconds of side 1], handovers)`: each side's compute time (the sum of its slices) and
    how many times side 0 handed over (about one per yield point; 0 means the hooks never fired).
    """
    turns = _Turns(first)
    sides = [_Side(index, turns, step, model, threads) for index, (step, model) in enumerate(zip(steps, models))]
    try:
        workers = [threading.Thread(target=side.run, name=f"lockstep-{side.index}") for side in sides]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        for side in sides:
            side.remove()
    for side in sides:
        if side.error is not None:
            raise side.error
    return [side.seconds for side in sides], sides[0].handovers
