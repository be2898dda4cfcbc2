# Copyright 2026 The llava-manager authors. Licensed under the Apache License, Version 2.0.
"""The `llava_onevision_manager` model type, registered with the Auto classes at import.

A patched model is a `LlavaOnevisionManagerForConditionalGeneration` (or, patched bare, a
`LlavaOnevisionManagerModel`): subclasses of transformers' LLaVA-OV classes that add nothing but the
patch, with a `LlavaOnevisionManagerConfig` (LLaVA-OV's config plus two plain dicts: `manager`,
`image_layout`). So `save_pretrained` writes an ordinary safetensors checkpoint and
`AutoModelForImageTextToText.from_pretrained` / `AutoModel.from_pretrained` rebuild the patched model,
with no `trust_remote_code`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)

from .attach import attach_from_config, llava_model_of
from .managers import init_manager_weights

MODEL_TYPE = "llava_onevision_manager"


class LlavaOnevisionManagerConfig(LlavaOnevisionConfig):
    """`LlavaOnevisionConfig` plus `manager` (a `ManagerConfig` dict, or None) and `image_layout` (an
    `ImageLayout` dict)."""

    model_type = MODEL_TYPE

    def __init__(self, manager: dict | None = None, image_layout: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.manager = dict(manager) if manager is not None else None
        self.image_layout = dict(image_layout) if image_layout is not None else {}


def _is_manager_key(key: str) -> bool:
    return "manager" in key.split(".")


class _ManagerModelMixin:
    """What both registered classes add to their transformers base class.

    - The Managers are attached in `post_init`, before transformers initialises the weights, so a model built from a
      config (also on the meta device, then `init_weights()`) gets them through `_init_weights` like every other
      weight, and `from_pretrained` initialises Manager weights a checkpoint lacks.
    - `_init_weights` knows the Manager modules (`managers.init_manager_weights`). transformers initialises a module
      through the `PreTrainedModel` that owns it, so the bare `LlavaOnevisionModel` holding `manager` needs this too,
      not only the outer class.
    - `from_pretrained` is strict about the Managers.
    """

    config_class = LlavaOnevisionManagerConfig

    def post_init(self):
        attach_from_config(self)
        use_manager_classes(self)  # the inner LlavaOnevisionModel too, whose _init_weights initialises the Managers
        super().post_init()

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: transformers treats classes defined outside its package as "custom code" and then, to protect
        remote code that writes weights in place, skips initialising every module without parameters of its own. That
        shortcut reaches into the SigLIP tower too (its MLP/attention modules initialise their Linear children), so a
        Manager model built on the meta device would get a differently initialised tower than LLaVA-OV. Our
        `_init_weights` uses `transformers.initialization` (which respects loaded weights) and ties no modules, which is
        what the shortcut guards against."""
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        from transformers import initialization as init

        if not init_manager_weights(module, init):
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, strict about the Managers: weights that do not fit the config's
        `manager` settings, or Manager weights missing from the checkpoint, raise `ManagerError`."""
        from .errors import ManagerError

        want_info = kwargs.pop("output_loading_info", False)
        # mismatched shapes are read from the loading info (not from an error's text); the caller's choice stands
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        mismatched = sorted(key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ()))
        if mismatched and not ignore_mismatched:
            raise ManagerError(
                f"{pretrained_model_name_or_path}: the weights do not match the shapes its config.json implies "
                f"({', '.join(mismatched[:4])}{', ...' if len(mismatched) > 4 else ''}); was config.json edited, or "
                "saved by a different run than the weights? (ignore_mismatched_sizes=True loads it anyway)"
            )
        missing_keys = set(info.get("missing_keys", ()))
        missing = sorted(k for k in missing_keys if _is_manager_key(k))
        # A checkpoint with the model's weights but not the Managers' is the real mistake (a base checkpoint under a
        # Manager config.json). When nothing at all loaded, or the caller passed its own state_dict, transformers'
        # contract holds: missing weights are initialised (zero Managers) and reported in the loading info.
        loaded_other_weights = any(k not in missing_keys and not _is_manager_key(k) for k in model.state_dict())
        if missing and loaded_other_weights and kwargs.get("state_dict") is None:
            raise ManagerError(
                f"{pretrained_model_name_or_path}: config.json declares Managers but the weights lack "
                f"{len(missing)} of their tensors (e.g. {missing[0]}); the checkpoint is incomplete or not a "
                "llava-manager checkpoint"
            )
        return (model, info) if want_info else model


class LlavaOnevisionManagerModel(_ManagerModelMixin, LlavaOnevisionModel):
    """The bare LLaVA-OneVision model (what `AutoModel` returns) with Managers: the image-text hidden states, for
    feature extraction and custom heads. `patch_llava` on a `LlavaOnevisionModel` makes one; `AutoModel.from_pretrained`
    loads it."""


class LlavaOnevisionManagerForConditionalGeneration(_ManagerModelMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with Managers (arXiv 2506.11515). Build it with `patch_llava` or load it with
    `AutoModelForImageTextToText.from_pretrained` / `llava_manager.from_pretrained`."""

    def generate(self, *args, **kwargs):
        """transformers' `generate`, refusing what the adaptive Managers cannot do (chunked prefill)."""
        from .injection import check_prefill_chunking

        generation_config = kwargs.get("generation_config") or self.generation_config
        chunk_size = kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None))
        check_prefill_chunking(self, chunk_size)
        if not _PRE_ENCODES_IN_GENERATE:  # otherwise _prepare_multimodal_encoder_kwargs_for_generation below
            self._idle_images_for_zero3(kwargs)
        return super().generate(*args, **kwargs)

    def _prepare_multimodal_encoder_kwargs_for_generation(self, model_kwargs: dict) -> dict:
        """transformers' pre-encoding (images, then videos) with ZeRO-3 ranks kept in step: a rank idles the image
        path before its own encoding when another rank has images and it has none, and the video path after it when
        another rank has videos and it has none (`zero3_sync.py`)."""
        from .zero3_sync import idle_image_features, idle_video_features, in_multi_rank_zero3, media_across_ranks

        if not in_multi_rank_zero3(self):
            return super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        has_images = model_kwargs.get("pixel_values") is not None
        has_videos = model_kwargs.get("pixel_values_videos") is not None
        any_images, any_videos = media_across_ranks(self, has_images, has_videos)
        if any_images and not has_images:
            idle_image_features(self.model)
        model_kwargs = super()._prepare_multimodal_encoder_kwargs_for_generation(model_kwargs)
        if any_videos and not has_videos:
            idle_video_features(self.model)
        return model_kwargs

    def _idle_images_for_zero3(self, kwargs: dict) -> None:
        """ZeRO-3 across ranks: transformers encodes images before the first forward (`mm_encoder_outputs`); a rank
        without images runs the image path on a blank one at that point, or the other ranks' gathers hang
        (`zero3_sync.py`)."""
        from .zero3_sync import idle_image_features, in_multi_rank_zero3

        has_media = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        pre_encodes = getattr(self, "_supports_mm_encoder_outputs", None)
        if has_media or pre_encodes is None or not pre_encodes():
            return
        if in_multi_rank_zero3(self):
            idle_image_features(self.model)


# transformers 5.2x encodes images and videos in generate() before the first forward, in this method
_PRE_ENCODES_IN_GENERATE = hasattr(
    LlavaOnevisionForConditionalGeneration, "_prepare_multimodal_encoder_kwargs_for_generation"
)

# the registered class of each transformers class patch_llava turns into it
MANAGER_CLASS_OF = {
    LlavaOnevisionModel: LlavaOnevisionManagerModel,
    LlavaOnevisionForConditionalGeneration: LlavaOnevisionManagerForConditionalGeneration,
}


def use_manager_classes(model, managers: bool = True) -> None:
    """transformers' LLaVA-OV classes -> their registered Manager subclasses (or back, `managers=False`), for `model`
    and its LlavaOnevisionModel. Other subclasses keep their class."""
    mapping = MANAGER_CLASS_OF if managers else {ours: theirs for theirs, ours in MANAGER_CLASS_OF.items()}
    for module in {id(m): m for m in (model, llava_model_of(model))}.values():
        if type(module) in mapping:
            module.__class__ = mapping[type(module)]


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, LlavaOnevisionManagerConfig, exist_ok=True)
    AutoModel.register(LlavaOnevisionManagerConfig, LlavaOnevisionManagerModel, exist_ok=True)
    AutoModelForImageTextToText.register(
        LlavaOnevisionManagerConfig, LlavaOnevisionManagerForConditionalGeneration, exist_ok=True
    )
    # the on-disk key layouts (legacy `language_model.model.*` ...) are LLaVA-OV's: for the model type, and for each
    # class that has its own (transformers looks class names up first: the bare model's layout differs)
    from transformers import conversion_mapping

    pairs = [("llava_onevision", MODEL_TYPE)] + [
        (base.__name__, ours.__name__) for base, ours in MANAGER_CLASS_OF.items()
    ]
    for theirs, ours in pairs:
        mapping = conversion_mapping.get_checkpoint_conversion_mapping(theirs)
        if mapping is not None:
            with contextlib.suppress(ValueError):  # already registered (re-import)
                conversion_mapping.register_checkpoint_conversion_mapping(ours, mapping)


_register()
