"""Lay per-crop features out as image tokens, exactly as LLaVA-OV does for its main feature.

Layout per image: base crop tokens (row-major), then the grid crops stitched, unpadded to the
image's aspect ratio, shrunk under `anyres_max_K`, with a newline vector after every row.
`square` mode: the base crop only, no newline. `pack_image` packs any channel width (the
bilinear shrink is per channel, so N Manager layers folded into channels pack exactly like the
main feature). Without the shrink, packing only copies tokens: `token_sources` gives, per packed
token, the crop row it copies, so the N layers can be laid out by one gather instead.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

from .errors import ManagerConfigError


def parse_max_crops(vision_aspect_ratio: str) -> int | None:
    """`"anyres_max_9"` -> 9, `"anyres"` -> None (no shrink). Strict: anything else raises."""
    if vision_aspect_ratio == "anyres":
        return None
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio or "")
    if match is None:
        raise ManagerConfigError(
            f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported: use 'anyres' or 'anyres_max_<N>'."
        )
    return int(match.group(1))


def kept_size(original: int, scale: float, unpad: str) -> int:
    """Size of the unpadded side: transformers rounds (`int(round(x, 7))`), the original truncates (`int(x)`)."""
    value = original * scale
    return int(round(value, 7)) if unpad == "round" else int(value)


def unpadded_window(height: int, width: int, original_hw: tuple[int, int], unpad_mode: str) -> tuple[slice, slice]:
    """Rows and columns of a `height x width` feature map that the AnyRes resize did not pad."""
    original_height, original_width = original_hw
    if original_width / original_height > width / height:
        new_height = kept_size(original_height, width / original_width, unpad_mode)
        padding = (height - new_height) // 2
        return slice(padding, height - padding), slice(0, width)
    new_width = kept_size(original_width, height / original_height, unpad_mode)
    padding = (width - new_width) // 2
    return slice(0, height), slice(padding, width - padding)


def unpad(feature_map: torch.Tensor, original_hw: tuple[int, int], unpad_mode: str) -> torch.Tensor:
    """Crop the padding that the AnyRes resize added. feature_map: (C, H, W) -> (C, h, w)."""
    rows, cols = unpadded_window(feature_map.shape[1], feature_map.shape[2], original_hw, unpad_mode)
    return feature_map[:, rows, cols]


def shrunk_size(height: int, width: int, side: int, max_crops: int | None) -> tuple[int, int] | None:
    """`anyres_max_K`: the bilinear target size of an unpadded `height x width` grid map, or None (no shrink)."""
    if max_crops is None:
        return None
    ratio = math.sqrt(height * width / (max_crops * side**2))
    if ratio <= 1.1:
        return None
    return int(height // ratio), int(width // ratio)


def packed_grid_size(
    height: int, width: int, original_hw: tuple[int, int], *, unpad_mode: str, side: int, max_crops: int | None
) -> tuple[int, int]:
    """Rows and columns of grid tokens (before newlines) that `pack_image` lays out for a stitched `height x width`
    grid map: unpadded, then shrunk under `anyres_max_K`. The processor counts image tokens with this, so its count
    and the model's layout cannot drift apart."""
    rows, cols = unpadded_window(height, width, original_hw, unpad_mode)
    kept_height, kept_width = len(range(height)[rows]), len(range(width)[cols])
    return shrunk_size(kept_height, kept_width, side, max_crops) or (kept_height, kept_width)


def pack_image(
    crop_features: torch.Tensor,
    image_size_hw: tuple[int, int],
    *,
    grid_pinpoints: list[list[int]],
    crop_pixels: int,
    newline: torch.Tensor | None,
    max_crops: int | None,
    unpad_mode: str = "round",
    square: bool = False,
) -> torch.Tensor:
    """Pack one image's crops into its token sequence.

    Args:
        crop_features (`torch.Tensor` of shape `(crops, side * side, C)`): crop 0 is the base (whole image),
            crops 1.. the AnyRes grid in row-major order.
        image_size_hw (`tuple[int, int]`): the original image size as (height, width).
        grid_pinpoints (`list[list[int]]`): the model's pinpoints, (height, width) pairs.
        crop_pixels (`int`): the vision tower's input size (384 for SigLIP-so400m).
        newline (`torch.Tensor` of shape `(C,)`, *optional*): appended after every row of the grid.
        max_crops (`int`, *optional*): the K of `anyres_max_K`, or None for plain `anyres`.
        unpad_mode (`str`): `"round"` (transformers) or `"truncate"` (original LLaVA-NeXT).
        square (`bool`): one crop, no newline (the no-grid checkpoints).

    Returns:
        `torch.Tensor` of shape `(tokens, C)`.
    """
    base = crop_features[0]  # (side*side, C)
    if square:
        return base
    if crop_features.shape[0] == 1:  # a single crop (multi-image samples): base + one newline, like transformers
        return base if newline is None else torch.cat([base, newline[None].to(base)], dim=0)
    side = math.isqrt(base.shape[0])
    if side * side != base.shape[0]:
        raise ValueError(f"a crop has {base.shape[0]} tokens, which is not a square grid")
    rows, cols = get_anyres_image_grid_shape(image_size_hw, grid_pinpoints, crop_pixels)
    grid = crop_features[1:].view(rows, cols, side, side, -1)  # (rows, cols, side, side, C)
    grid = grid.permute(4, 0, 2, 1, 3).contiguous()  # (C, rows, side, cols, side)
    grid = grid.flatten(1, 2).flatten(2, 3)  # (C, rows*side, cols*side)
    grid = unpad(grid, image_size_hw, unpad_mode)
    target = shrunk_size(grid.shape[1], grid.shape[2], side, max_crops)
    if target is not None:
        grid = nn.functional.interpolate(grid[None], list(target), mode="bilinear")[0]
    if newline is not None:
        newline_column = newline[:, None, None].to(grid).expand(*grid.shape[:-1], 1)  # (C, h, 1)
        grid = torch.cat([grid, newline_column], dim=-1)  # (C, h, w+1)
    grid = grid.flatten(1, 2).transpose(0, 1)  # (h*(w+1), C)
    return torch.cat([base, grid], dim=0)


def token_sources(
    num_crops: int,
    tokens_per_crop: int,
    image_size_hw: tuple[int, int],
    *,
    grid_pinpoints: list[list[int]],
    crop_pixels: int,
    with_newline: bool,
    max_crops: int | None,
    unpad_mode: str = "round",
    square: bool = False,
) -> torch.Tensor | None:
    """Where each packed token of one image comes from, when packing only copies.

    Returns:
        `torch.Tensor` of shape `(tokens,)` (long): for every token `pack_image` would produce, the row of the image's
        flattened `(crops * tokens_per_crop, C)` features it copies, or -1 for a newline token. None when the
        `anyres_max` bilinear shrink applies (those tokens are blends, not copies). The layout is `pack_image`'s own,
        applied to row numbers, so the two cannot disagree.
    """
    if not square and num_crops > 1:
        side = math.isqrt(tokens_per_crop)
        rows, cols = get_anyres_image_grid_shape(image_size_hw, grid_pinpoints, crop_pixels)
        unpadded_hw = packed_grid_size(
            rows * side, cols * side, image_size_hw, unpad_mode=unpad_mode, side=side, max_crops=None
        )
        if shrunk_size(*unpadded_hw, side, max_crops) is not None:
            return None
    row_numbers = torch.arange(num_crops * tokens_per_crop).view(num_crops, tokens_per_crop, 1)
    newline = torch.tensor([-1]) if with_newline else None
    sources = pack_image(
        row_numbers,
        image_size_hw,
        grid_pinpoints=grid_pinpoints,
        crop_pixels=crop_pixels,
        newline=newline,
        max_crops=None,
        unpad_mode=unpad_mode,
        square=square,
    )  # (tokens, 1)
    return sources[:, 0]
