"""What the vLLM model refuses before building anything: adaptive Managers and pipeline parallelism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llava_manager import ManagerConfig
from llava_manager.errors import ManagerError
from llava_manager.serving.vllm_model import check_servable


def _vllm_config(pipeline: int = 1):
    return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline))


@pytest.mark.parametrize("kind", ["adaptive", "adaptive_last", "adaptive_average", "adaptive_cross"])
def test_adaptive_managers_are_refused_naming_transformers(kind):
    with pytest.raises(ManagerError, match="adaptive Managers .* transformers' generate"):
        check_servable(ManagerConfig(manager_type=kind, query_token_id=1), _vllm_config())


def test_pipeline_parallelism_is_refused_naming_tensor_parallelism():
    with pytest.raises(ManagerError, match="--tensor-parallel-size"):
        check_servable(ManagerConfig(), _vllm_config(pipeline=2))


@pytest.mark.parametrize("kind", ["static", "bridge", "tower"])
def test_static_families_are_served(kind):
    check_servable(ManagerConfig(manager_type=kind), _vllm_config())
    check_servable(None, _vllm_config(pipeline=2))  # no Managers: nothing to refuse
