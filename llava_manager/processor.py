"""The processor of a converted checkpoint: transformers' `LlavaOnevisionProcessor`, made to agree with the model.

transformers' LLaVA-OV processor counts image tokens with transformers' own arithmetic (rounding unpad,
always `anyres_max_N`, no square mode). A converted original checkpoint lays its image tokens out
differently (`ImageLayout`: truncating unpad, plain `anyres` without a shrink, or one square crop
per image), so this module adds two small subclasses, registered with the Auto classes at import:

- `LlavaOnevisionManagerImageProcessor`: the PIL image processor (it reproduces the original
  preprocessing bit for bit; the torchvision one differs by up to 18/255 on some pixels) plus
  `crop_mode`: `"anyres"` (base crop + AnyRes grid), `"square"` (the whole image resized to one crop,
  the original `square`), `"pad"` (padded to a square with the mean colour, then resized: the
  original `pad`).
- `LlavaOnevisionManagerProcessor`: counts image tokens exactly as the patched model packs them.

`build_processor` assembles one from a tokenizer and a converted model's config.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
from transformers import AutoImageProcessor, AutoProcessor, LlavaOnevisionProcessor
from transformers.image_processing_utils import BatchFeature, select_best_resolution
from transformers.image_utils import SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorKwargs,
    LlavaOnevisionImageProcessorPil,
)

from .config import ImageLayout, ManagerError
from .chat_format import CHAT_TEMPLATE, SYSTEM_PROMPT  # noqa: F401  (SYSTEM_PROMPT: re-exported)
from .convert import ConversionError
from .modeling import LlavaOnevisionManagerConfig
from .packing import kept_size, parse_max_crops

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
CROP_MODES = ("anyres", "square", "pad")



class LlavaOnevisionManagerImageProcessorKwargs(LlavaOnevisionImageProcessorKwargs, total=False):
    r"""
    crop_mode (`str`, *optional*, defaults to `"anyres"`):
        `"anyres"`: a base crop plus the AnyRes grid (transformers' LLaVA-OV). `"square"`: one crop per image, the
        whole image resized to `size` (aspect ratio not kept). `"pad"`: one crop per image, the image padded to a
        square with the mean colour, then resized.
    """

    crop_mode: str


class LlavaOnevisionManagerImageProcessor(LlavaOnevisionImageProcessorPil):
    """transformers' PIL LLaVA-OV image processor plus `crop_mode` (see the module docstring).

    Returns `pixel_values` of shape `(images, crops, 3, size, size)` (one crop per image in `"square"` and
    `"pad"` mode), `image_sizes` as (height, width) and `batch_num_images`, like transformers.
    """

    valid_kwargs = LlavaOnevisionManagerImageProcessorKwargs
    crop_mode = "anyres"
    image_mean = SIGLIP_MEAN
    image_std = SIGLIP_STD

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.crop_mode not in CROP_MODES:
            raise ManagerError(
                f"LlavaOnevisionManagerImageProcessor.crop_mode={self.crop_mode!r} is invalid: choose one of "
                f"{', '.join(CROP_MODES)}."
            )

    def _preprocess(self, images, batch_num_images, **kwargs) -> BatchFeature:
        crop_mode = kwargs.pop("crop_mode", None) or self.crop_mode
        if crop_mode == "anyres":
            return super()._preprocess(images, batch_num_images, **kwargs)
        if crop_mode not in CROP_MODES:
            raise ManagerError(f"crop_mode={crop_mode!r} is invalid: choose one of {', '.join(CROP_MODES)}.")
        size: SizeDict = kwargs["size"]
        target = (
            SizeDict(height=size.height, width=size.width)
            if size.height
            else SizeDict(height=size.shortest_edge, width=size.shortest_edge)
        )
        pixel_values, image_sizes = [], []
        for image in images:  # (3, H, W) uint8 numpy, channels first
            image_sizes.append(image.shape[-2:])
            if crop_mode == "pad":  # the original expand2square: paste centred on a mean-coloured square
                image = self.pad_to_square(image, background_color=tuple(int(x * 255) for x in self.image_mean))
            if kwargs["do_resize"]:
                image = self.resize(image=image, size=target, resample=kwargs["resample"])
            if kwargs["do_rescale"]:
                image = self.rescale(image=image, scale=kwargs["rescale_factor"])
            if kwargs["do_normalize"]:
                image = self.normalize(image=image, mean=kwargs["image_mean"], std=kwargs["image_std"])
            pixel_values.append(np.asarray(image)[None])  # (1, 3, size, size): one crop
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes, "batch_num_images": batch_num_images},
            tensor_type=kwargs.get("return_tensors"),
        )


class LlavaOnevisionManagerProcessor(LlavaOnevisionProcessor):
    """transformers' `LlavaOnevisionProcessor` whose image-token counts follow the model's `ImageLayout`.

    Args:
        image_layout (`dict`, *optional*): the model's `config.image_layout` (`{"mode": "anyres" | "square",
            "unpad": "round" | "truncate"}`); defaults to transformers' layout.
        other arguments: as `LlavaOnevisionProcessor`; `vision_aspect_ratio` may also be plain `"anyres"` (no
            shrink, the stage-1.5 checkpoints).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        image_layout=None,
        **kwargs,
    ):
        layout = ImageLayout.from_dict(image_layout)  # validates
        self.image_layout = layout.to_dict()
        if layout.mode == "anyres":
            parse_max_crops(vision_aspect_ratio)  # strict: "anyres" or "anyres_max_<N>"
        crop_mode = getattr(image_processor, "crop_mode", "anyres")
        if (layout.mode == "square") != (crop_mode in ("square", "pad")):
            raise ManagerError(
                f"image_layout mode {layout.mode!r} does not fit the image processor's crop_mode {crop_mode!r}: "
                "a square layout needs crop_mode 'square' or 'pad', an anyres layout needs 'anyres'."
            )
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout.from_dict(self.image_layout)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.layout.mode != "square":
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        num_image_tokens = self.num_image_tokens  # one crop, no newline, whatever the image count
        if self.vision_feature_select_strategy == "default":
            num_image_tokens -= 1
        return self.image_token * num_image_tokens

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Image tokens of one (single-image) sample: base crop + unpadded grid + one newline per grid row."""
        if self.layout.mode == "square":
            return self.num_image_tokens
        grid_height, grid_width = select_best_resolution(
            [orig_height, orig_width], self.image_processor.image_grid_pinpoints
        )
        rows, cols = grid_height // height, grid_width // width
        side = math.isqrt(self.num_image_tokens)
        unpadded, newlines = self._get_unpadded_features(orig_height, orig_width, side, side, rows, cols)
        return self.num_image_tokens + unpadded + newlines

    def _get_unpadded_features(self, height, width, patches_height, patches_width, scale_height, scale_width):
        """(grid tokens, newline tokens) after unpad (the layout's arithmetic) and the `anyres_max_N` shrink."""
        current_height, current_width = patches_height * scale_height, patches_width * scale_width
        if width / height > current_width / current_height:
            new_height = kept_size(height, current_width / width, self.layout.unpad)
            current_height -= (current_height - new_height) // 2 * 2
        else:
            new_width = kept_size(width, current_height / height, self.layout.unpad)
            current_width -= (current_width - new_width) // 2 * 2
        max_crops = parse_max_crops(self.vision_aspect_ratio)
        if max_crops is not None:
            ratio = math.sqrt(current_height * current_width / (max_crops * patches_height**2))
            if ratio > 1.1:
                current_height, current_width = int(current_height // ratio), int(current_width // ratio)
        return current_height * current_width, current_height

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:  # torchvision missing: no video processor
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


# ---- assembly ------------------------------------------------------------------------------------------------

TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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


def prepare_tokenizer(tokenizer_or_path, original_config: dict | None = None):
    """The checkpoint's tokenizer with `<image>` / `<video>` (added after the vocabulary when missing), left
    padding (for batched generation) and the `qwen_1_5` chat template. A given tokenizer object is copied."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, PretrainedConfig

    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        path = Path(tokenizer_or_path)
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILE_NAMES):
            raise ConversionError(
                f"{path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); pass tokenizer= a "
                "tokenizer or its folder (the released models use Qwen/Qwen2-0.5B-Instruct's)"
            )
        # An original config.json beside the tokenizer says model_type "qwen2", which would make AutoTokenizer
        # pick Qwen2Tokenizer whatever tokenizer_config.json declares: an empty config lets the declared class win.
        hint = {"config": PretrainedConfig()} if (path / "config.json").is_file() else {}
        try:  # a folder, or a Hub id (AutoTokenizer then fetches the tokenizer files only)
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_or_path), **hint)
        except Exception as error:
            raise ConversionError(f"the tokenizer {os.fspath(tokenizer_or_path)!r} cannot be loaded: {error}") from None
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


def _register() -> None:
    AutoImageProcessor.register(
        LlavaOnevisionManagerConfig,
        # the PIL class for both backends on purpose: it is the one that matches the original preprocessing
        image_processor_classes={
            "pil": LlavaOnevisionManagerImageProcessor,
            "torchvision": LlavaOnevisionManagerImageProcessor,
        },
        exist_ok=True,
    )
    AutoProcessor.register(LlavaOnevisionManagerConfig, LlavaOnevisionManagerProcessor, exist_ok=True)


_register()
