"""Assemble a checkpoint's processor: the tokenizer prepared for LLaVA-OV (`<image>` / `<video>`, left padding, the
chat template) and a `LlavaOnevisionManagerProcessor` whose token counts match the model's config."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..chat_format import CHAT_TEMPLATE
from ..config import ImageLayout
from ..errors import ConversionError, ManagerError
from ..processor import SIGLIP_MEAN, SIGLIP_STD, LlavaOnevisionManagerImageProcessor, LlavaOnevisionManagerProcessor
from .files import has_tokenizer_files


def crop_mode_for(original_config: dict) -> str:
    """The image processor's `crop_mode` for an original config's `image_aspect_ratio`."""
    aspect = original_config.get("image_aspect_ratio") or "square"
    if aspect.startswith("anyres"):
        return "anyres"
    if aspect in ("square", "pad"):
        return aspect
    raise ConversionError(
        f"image_aspect_ratio={aspect!r} is not supported: the released checkpoints use 'anyres_max_9', 'anyres', "
        "'square' or 'pad'"
    )


def load_tokenizer(path_or_id, hub_kwargs: dict | None = None):
    """The tokenizer in a folder or Hub repo (only its tokenizer files are fetched), as its files declare it."""
    from transformers import AutoTokenizer, PretrainedConfig

    path = Path(path_or_id)
    if path.is_dir() and not has_tokenizer_files(path):
        raise ConversionError(
            f"{path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); pass tokenizer= a "
            "tokenizer or its folder (the released models use Qwen/Qwen2-0.5B-Instruct's)"
        )
    # A config.json beside the tokenizer saying model_type "qwen2" would make AutoTokenizer pick Qwen2Tokenizer
    # whatever tokenizer_config.json declares: an empty config lets the declared class win.
    hint = {"config": PretrainedConfig()} if (path / "config.json").is_file() else {}
    try:  # a folder, or a Hub id (AutoTokenizer then fetches the tokenizer files only)
        return AutoTokenizer.from_pretrained(os.fspath(path_or_id), **hint, **(hub_kwargs or {}))
    except Exception as error:
        raise ConversionError(f"the tokenizer {os.fspath(path_or_id)!r} cannot be loaded: {error}") from None


def prepare_tokenizer(tokenizer_or_path, original_config: dict | None = None):
    """The checkpoint's tokenizer with `<image>` / `<video>` (added after the vocabulary when missing), left
    padding (for batched generation) and the `qwen_1_5` chat template. A given tokenizer object is copied."""
    from tokenizers import AddedToken

    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer_or_path)
    else:
        tokenizer = copy.deepcopy(tokenizer_or_path)
    missing = [token for token in ("<image>", "<video>") if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if original_config is not None and "vocab_size" in original_config:
        rows = original_config["vocab_size"]
        too_large = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")}
        too_large = {t: i for t, i in too_large.items() if i >= rows}
        if too_large:
            raise ConversionError(
                f"the tokenizer's ids {too_large} do not fit the model's {rows}-row embedding; give the tokenizer "
                "<image> and <video> tokens with ids below that"
            )
        if original_config.get("tokenizer_model_max_length"):
            tokenizer.model_max_length = original_config["tokenizer_model_max_length"]
    for loading_option in ("is_local", "local_files_only"):  # from_pretrained leaks these into the saved config
        tokenizer.init_kwargs.pop(loading_option, None)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: saved with the tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(model_config, tokenizer, *, crop_mode: str | None = None) -> LlavaOnevisionManagerProcessor:
    """A processor whose preprocessing and image-token counts match `model_config` (a converted model's config).

    Args:
        model_config (`LlavaOnevisionConfig`): gives the crop size, patch size, pinpoints ((height, width), as
            transformers), `vision_aspect_ratio`, `image_layout` and the `<image>` / `<video>` ids.
        tokenizer (`PreTrainedTokenizerBase`): with `<image>` and `<video>` tokens (see `prepare_tokenizer`).
        crop_mode (`str`, *optional*): `"anyres"`, `"square"` or `"pad"`; defaults to what the layout implies
            (`"square"` for a square layout).
    """
    from transformers.utils import is_torchvision_available

    layout = ImageLayout.from_dict(getattr(model_config, "image_layout", None))
    crop_mode = crop_mode or ("square" if layout.mode == "square" else "anyres")
    for token, expected in (("<image>", model_config.image_token_id), ("<video>", model_config.video_token_id)):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected:
            raise ManagerError(f"the tokenizer's {token} id {actual} differs from the model's {expected}")
    vision = model_config.vision_config
    size = {"height": vision.image_size, "width": vision.image_size}
    image_processor = LlavaOnevisionManagerImageProcessor(
        size=size,
        image_grid_pinpoints=[list(p) for p in model_config.image_grid_pinpoints],
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        crop_mode=crop_mode,
    )
    video_processor = None
    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return LlavaOnevisionManagerProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=model_config.vision_feature_select_strategy,
        vision_aspect_ratio=model_config.vision_aspect_ratio,
        image_layout=layout.to_dict(),
        chat_template=CHAT_TEMPLATE,
    )
