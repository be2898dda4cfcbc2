"""The `vllm.general_plugins` entry point: makes `vllm serve <Manager checkpoint>` and `LLM(<checkpoint>)` work.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once:
it is re-entrant. The model class is registered by its `"module:Class"` string, so vLLM imports it only when a
Manager checkpoint is actually loaded.
"""

from __future__ import annotations

ARCHITECTURE = "LlavaOnevisionManagerForConditionalGeneration"
MODEL_PATH = "llava_manager.serving.vllm_model:LlavaOnevisionManagerForConditionalGeneration"
#: the vLLM releases whose model interfaces this plugin is written against (also the `vllm` extra's pin)
SUPPORTED_VLLM = ((0, 32), (0, 33))  # [lowest, highest) by (major, minor)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range this plugin supports."""


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_vllm_version(version: str) -> None:
    """Raise `UnsupportedVllmError` unless `version` is in `SUPPORTED_VLLM`."""
    low, high = SUPPORTED_VLLM
    if not low <= _version_tuple(version) < high:
        raise UnsupportedVllmError(
            f"llava-manager's vLLM plugin supports vLLM >={low[0]}.{low[1]},<{high[0]}.{high[1]}; this is vLLM "
            f"{version}. Install a supported release (pip install 'llava-manager[vllm]'), or keep this vLLM and skip "
            "the plugin with VLLM_PLUGINS naming only the plugins you want (Manager checkpoints then do not load)."
        )


def register() -> None:
    """Register the Manager architecture with vLLM and the `llava_onevision_manager` config with transformers."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    import llava_manager.modeling  # noqa: F401  (registers the config and model type with the Auto classes)
    import llava_manager.processor  # noqa: F401  (registers the layout-aware processor with AutoProcessor)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
