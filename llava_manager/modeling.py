"""The `llava_onevision_manager` model type, registered with the Auto classes at import.

A patched model is a `LlavaOnevisionManagerForConditionalGeneration` (a subclass of transformers'
LLaVA-OV class that adds nothing but the patch) with a `LlavaOnevisionManagerConfig` (LLaVA-OV's
config plus two plain dicts: `manager`, `image_layout`). So `save_pretrained` writes an ordinary
safetensors checkpoint and `AutoModelForImageTextToText.from_pretrained` rebuilds the patched
model, with no `trust_remote_code`.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from .managers import AdaptiveManager, CrossQuery, LayerEmbedding, StaticManager

MODEL_TYPE = "llava_onevision_manager"


class LlavaOnevisionManagerConfig(LlavaOnevisionConfig):
    """`LlavaOnevisionConfig` plus `manager` (a `ManagerConfig` dict, or None) and `image_layout` (an
    `ImageLayout` dict)."""

    model_type = MODEL_TYPE

    def __init__(self, manager: dict | None = None, image_layout: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.manager = dict(manager) if manager is not None else None
        self.image_layout = dict(image_layout) if image_layout is not None else {}


class LlavaOnevisionManagerForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with Managers (arXiv 2506.11515). Build it with `patch_llava` or load it with
    `AutoModelForImageTextToText.from_pretrained` / `llava_manager.from_pretrained`."""

    config_class = LlavaOnevisionManagerConfig

    def __init__(self, config: LlavaOnevisionManagerConfig):
        super().__init__(config)
        from .patch import attach_from_config

        attach_from_config(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, strict about the Managers: weights that do not fit the config's
        `manager` settings, or Manager weights missing from the checkpoint, raise `ManagerError`."""
        from .config import ManagerError

        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "mismatched" not in str(error):
                raise
            raise ManagerError(
                f"{pretrained_model_name_or_path}: the weights do not match the shapes its config.json implies (see "
                "the load report above); was config.json edited, or saved by a different run than the weights?"
            ) from error
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith("model.manager."))
        if missing:
            raise ManagerError(
                f"{pretrained_model_name_or_path}: config.json declares Managers but the weights lack "
                f"{len(missing)} of their tensors (e.g. {missing[0]}); the checkpoint is incomplete or not a "
                "llava-manager checkpoint"
            )
        return (model, info) if want_info else model

    def generate(self, *args, **kwargs):
        """transformers' `generate`, refusing what the adaptive Managers cannot do (chunked prefill)."""
        from .injection import check_prefill_chunking

        generation_config = kwargs.get("generation_config") or self.generation_config
        chunk_size = kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None))
        check_prefill_chunking(self, chunk_size)
        return super().generate(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        from transformers import initialization as init

        if isinstance(module, StaticManager):
            init.zeros_(module.layer_scores)
        elif isinstance(module, AdaptiveManager):
            init.zeros_(module.zero_gate)
        elif isinstance(module, LayerEmbedding):
            init.normal_(module.weight, mean=0.0, std=1 / math.sqrt(module.width))
        elif isinstance(module, CrossQuery):
            pass  # its Linear layers are initialised by the base class


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, LlavaOnevisionManagerConfig, exist_ok=True)
    AutoModelForImageTextToText.register(
        LlavaOnevisionManagerConfig, LlavaOnevisionManagerForConditionalGeneration, exist_ok=True
    )
    # the on-disk key layout (legacy `language_model.model.*` ...) is LLaVA-OV's
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping("llava_onevision")
    if mapping is not None:
        try:
            conversion_mapping.register_checkpoint_conversion_mapping(MODEL_TYPE, mapping)
        except ValueError:  # already registered (re-import)
            pass


_register()
