"""The vLLM plugin's parts that need no vLLM: the version range it accepts (the same as the `vllm` extra's pin),
and its entry point (what needs vLLM is in tests/vllm)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from llava_manager.serving.vllm_plugin import SUPPORTED_VLLM, UnsupportedVllmError, check_vllm_version

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", ["0.32.0", "0.32.4", "0.32.0+cpu", "0.32.1rc1"])
def test_supported_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_versions_are_refused_with_the_range_and_the_way_out(version):
    with pytest.raises(UnsupportedVllmError, match=r">=0\.32,<0\.33.*VLLM_PLUGINS"):
        check_vllm_version(version)


def test_the_extra_pins_the_range_the_plugin_accepts_and_declares_the_entry_point():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_VLLM
    assert setup["options.extras_require"]["vllm"].split() == [
        f"vllm>={low_major}.{low_minor},<{high_major}.{high_minor}"
    ]
    plugins = setup["options.entry_points"]["vllm.general_plugins"].split("=")
    assert [part.strip() for part in plugins] == ["llava_manager", "llava_manager.serving.vllm_plugin:register"]
