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

`llava_manager.checkpoint.assembly.build_processor` assembles one from a tokenizer and a model's config.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from transformers import AutoImageProcessor, AutoProcessor, LlavaOnevisionProcessor
from transformers.image_processing_utils import BatchFeature, select_best_resolution
from transformers.image_utils import SizeDict
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorKwargs,
    LlavaOnevisionImageProcessorPil,
)

from ._moved import forward_moved_names
from .config import ImageLayout
from .errors import ManagerError
from .modeling import LlavaOnevisionManagerConfig
from .packing import packed_grid_size, parse_max_crops

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
        """(grid tokens, newline tokens): `packing.packed_grid_size`, the arithmetic the model packs with."""
        grid_height, grid_width = packed_grid_size(
            patches_height * scale_height,
            patches_width * scale_width,
            (height, width),
            unpad_mode=self.layout.unpad,
            side=patches_height,
            max_crops=parse_max_crops(self.vision_aspect_ratio),
        )
        return grid_height * grid_width, grid_height

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:  # torchvision missing: no video processor
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _register() -> None:
    # older transformers (5.15) without torchvision: its Auto image classes need it (the `vision` extra); loading a
    # processor asks for that extra first (checkpoint/loading.py), so skipping the registration loses nothing
    with contextlib.suppress(ImportError):
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


__getattr__ = forward_moved_names(
    __name__,
    {
        "crop_mode_for": "llava_manager.checkpoint.assembly",
        "prepare_tokenizer": "llava_manager.checkpoint.assembly",
        "build_processor": "llava_manager.checkpoint.assembly",
        "CHAT_TEMPLATE": "llava_manager.chat_format",
        "SYSTEM_PROMPT": "llava_manager.chat_format",
    },
)
