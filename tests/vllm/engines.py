"""vLLM engines for the tests: one `LLM` at a time (each holds a KV cache and an engine process)."""

from __future__ import annotations

import contextlib
import gc

COMMON = {
    "dtype": "float32",
    "max_model_len": 1024,
    "gpu_memory_utilization": 0.1,  # on CPU: the share of RAM for the KV cache
    "limit_mm_per_prompt": {"image": 2, "video": 1},
    "seed": 0,
}


@contextlib.contextmanager
def engine(model, **overrides):
    """An `LLM` for `model` (fp32, eager unless `enforce_eager=False`), shut down on exit."""
    from vllm import LLM

    llm = None
    try:
        llm = LLM(model=str(model), **{"enforce_eager": True, **COMMON, **overrides})
        yield llm
    finally:
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5)
