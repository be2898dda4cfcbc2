"""train.host_memory: a fixed glibc mmap threshold gives freed tensors back to the system (ZeRO-3's pattern of
creating whole modules, keeping a slice and freeing the rest), checked in fresh processes (the setting is global)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PATTERN = r"""
import json, sys
from pathlib import Path
import torch
from llava_manager.train import host_memory

def anon_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

applied = host_memory.return_freed_tensors() if sys.argv[1] == "fixed" else False
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # a freed large block: glibc raises its threshold past 8 MB
start = anon_mb()
kept = []
for i in range(60):  # like zero.Init: a whole parameter (4 MB and growing), this rank's half kept, the whole freed
    whole = torch.ones((1 << 20) + i * (1 << 14))
    kept.append(whole[: whole.numel() // 2].clone())
    del whole
print(json.dumps({"applied": applied, "growth_mb": anon_mb() - start}))
"""


def _run(mode: str, env_extra: dict | None = None) -> dict:
    import os

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_fixed_threshold_returns_freed_parameters():
    default, fixed = _run("default"), _run("fixed")
    assert fixed["applied"] is True
    kept_mb = sum(((1 << 20) + i * (1 << 14)) * 2 for i in range(60)) / 2**20
    # glibc's defaults keep the freed 4 MB blocks between the kept slices; the fixed threshold hands them back
    assert default["growth_mb"] > 1.3 * kept_mb, default
    assert fixed["growth_mb"] < 1.15 * kept_mb, fixed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_users_malloc_setting_wins():
    assert _run("fixed", {"MALLOC_MMAP_THRESHOLD_": "131072"})["applied"] is False
