"""Shared test setup: offline, single-process DeepSpeed on CPU without JIT ops, tiny models."""

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The HF Trainer with DeepSpeed needs a (single-process) distributed environment.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(_free_port()))
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("LOCAL_RANK", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

try:  # skip DeepSpeed's shm comm op: it is JIT-compiled C++ (25 s) and useless on one machine
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except Exception:  # pragma: no cover - deepspeed is a hard dependency, but keep collection alive
    pass


@pytest.fixture(autouse=True)
def _restore_process_state():
    """In-process training sets ACCELERATE_* / distributed variables and torch's thread count (recipe cpu_threads);
    give every test the environment and threads the session started with, whatever ran before it."""
    saved_env = dict(os.environ)
    threads = torch.get_num_threads()
    yield
    for key in set(os.environ) - set(saved_env):
        del os.environ[key]
    os.environ.update(saved_env)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_hf_deepspeed_config():
    """A TrainingArguments(deepspeed=stage3) makes every later from_pretrained run under zero.Init."""
    yield
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except Exception:  # pragma: no cover
        pass


@pytest.fixture
def tiny_model():
    from llava_manager.testing.tiny import tiny_model as build

    return build()


@pytest.fixture
def tiny_processor():
    from llava_manager.testing.tiny import tiny_processor as build

    return build()
