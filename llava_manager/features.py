"""Image features of a patched model: the main feature and the Managers' multi-layer features.

`ImageFeatureComputer.__call__` stands in for `LlavaOnevisionModel.get_image_features` on a patched
model (same signature, so `generate()` calls it before prefill exactly as it calls the original).
It runs all crops of the batch through SigLIP in one call, captures only the selected layers,
projects the main feature and packs it like transformers, and lays the N stacked layers out like
it with one gather over the whole batch (packing.token_sources), projecting them in one batched
call with the model's own projector: before the gather when the layout drops rows (unpadding, grid
spans), so only kept rows are projected; after it otherwise. The result is the token-major
`(T, N, D)` layout the Managers read. The Manager features travel with the image features as
`deepstack_features` (one `(tokens, N * D)` tensor per image, consecutive row blocks of that one
tensor): transformers' generation expands them for beam search and slices them for chunked prefill
exactly like `pooler_output`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .config import ImageLayout, ManagerConfig
from .forward_state import ForwardScope
from .managers import ManagerStack
from .packing import pack_image, parse_max_crops, token_sources
from .vision import VisionCapture


@dataclass
class ManagerImageOutput(BaseModelOutputWithPooling):
    """`get_image_features` output of a patched model.

    pooler_output (`list[torch.Tensor]`): per image, `(tokens, D)` main features (as transformers).
    deepstack_features (`list[list[torch.Tensor]]`, *optional*): `[[per image (tokens, N * D)]]`, the Managers'
        multi-layer features laid out like `pooler_output` (rows outside the `grid` span are zero).
    """

    deepstack_features: list | None = None

    #: not a field (generation never copies it): `(per-image tensors, the one (T, N * D) tensor they split)`, so
    #: the injection can take that tensor instead of concatenating the parts, when it is handed these very parts
    joined_layer_features = None


def _whole(parameter: torch.nn.Parameter | None):
    """Context in which a ZeRO-3-partitioned `parameter` is whole.

    ZeRO-3 gathers a module's own parameters only around its forward. `generate()` calls `get_image_features`
    before (outside) the model's forward, so the bare `image_newline` would still be an empty shard there.
    """
    if parameter is None or parameter.numel() > 0 or not getattr(parameter, "ds_numel", 0):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([parameter], modifier_rank=None)


class ImageFeatureComputer:
    """Callable that replaces `get_image_features` on one patched `LlavaOnevisionModel` instance."""

    def __init__(
        self,
        llava_model,
        stack: ManagerStack | None,
        config: ManagerConfig | None,
        layout: ImageLayout,
        scope: ForwardScope | None = None,
        *,
        tower_hooks: bool = True,
    ):
        """`tower_hooks=False`: no hooks on the vision tower (a caller that gets the layers some other way, e.g. vLLM's
        tower with `select_layers`, uses only the packing helpers)."""
        self.llava_model = llava_model
        self.scope = scope  # where the output goes when computed inside a forward (None: layout only, keep nothing)
        self.stack = stack
        self.config = config
        self.layout = layout
        model_config = llava_model.config
        self.main_entry = model_config.vision_feature_layer % (model_config.vision_config.num_hidden_layers + 1)
        self.vision_layers = list(config.vision_layers) if config is not None else []
        self.capture = (
            VisionCapture(llava_model.vision_tower, [self.main_entry, *self.vision_layers]) if tower_hooks else None
        )

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()

    # The signature mirrors transformers' get_image_features: generate() inspects it to pick its kwargs.
    def __call__(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        **kwargs,
    ) -> ManagerImageOutput | tuple:
        """transformers' `get_image_features` with the Managers' multi-layer features added. Keyword arguments go to
        the vision tower as in transformers (`output_hidden_states=True` / `output_attentions=True` return the tower's
        hidden states / attentions); `return_dict=False` (argument or config) returns a tuple."""
        model = self.llava_model
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:  # as transformers' merge_with_config_defaults
            return_dict = getattr(model.config, "return_dict", True)
        config = model.config
        select_strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if vision_feature_layer is not None and vision_feature_layer != config.vision_feature_layer:
            raise ValueError(
                f"a patched model computes its features from vision_feature_layer={config.vision_feature_layer}; "
                f"got vision_feature_layer={vision_feature_layer!r} at call time"
            )
        square = self.layout.mode == "square"
        max_crops = None if square else parse_max_crops(vision_aspect_ratio or config.vision_aspect_ratio)

        crops_per_image = self._crops_per_image(image_sizes, batch_num_images, square)
        if pixel_values.dim() == 5:  # (images, max_crops, 3, H, W), padded per image
            pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops_per_image)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")

        # all crops of the batch in one tower call, as the original does
        with self.capture.capture() as captured:
            tower_output = model.vision_tower(pixel_values, return_dict=True, **kwargs)
        main = captured[self.main_entry]  # (crops, P, C)
        if select_strategy == "default":
            main = main[:, 1:]
        layer_stack = None
        if self.vision_layers:
            # token-major: each token's N layers side by side, the layout the Managers read
            layer_stack = torch.stack([captured[entry] for entry in self.vision_layers], dim=2)  # (crops, P, N, C)
            if select_strategy == "default":
                layer_stack = layer_stack[:, 1:]
        captured.clear()

        if layer_stack is not None and self.config.injection == "projector":
            main = main + self._vision_residual(layer_stack, crops_per_image)
            layer_stack = None
        main = model.multi_modal_projector(main)  # (crops, P, D)
        # the N layers stay in SigLIP space here: _pack_layers projects them (only the kept rows when the layout drops some)
        with _whole(None if square else model.image_newline):
            packed_main, packed_layers, joined_layers = self._pack(
                main, layer_stack, crops_per_image, image_sizes, max_crops=max_crops, square=square
            )
        output = ManagerImageOutput(
            last_hidden_state=tower_output.last_hidden_state,
            pooler_output=packed_main,
            hidden_states=tower_output.hidden_states,
            attentions=tower_output.attentions,
            deepstack_features=[packed_layers] if packed_layers is not None else None,
        )
        if joined_layers is not None:
            output.joined_layer_features = (tuple(packed_layers), joined_layers)
        state = self.scope.current() if self.scope is not None else None
        if state is not None:  # inside a forward: the injection hooks read it from there
            state.image_output = output
        return output if return_dict else output.to_tuple()

    # ---- helpers ------------------------------------------------------------------------------------
    def _crops_per_image(self, image_sizes, batch_num_images, square: bool) -> list[int]:
        config = self.llava_model.config
        if square:
            return [1] * len(image_sizes)
        if batch_num_images is None:
            need_grid = [True] * len(image_sizes)
        else:  # multi-image samples: one crop per image
            need_grid = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if grid
            else 1
            for size, grid in zip(image_sizes, need_grid)
        ]

    def _crop_is_managed(self, crops_per_image: list[int], device) -> torch.Tensor:
        """(crops,) bool: which crops the `grid` setting gives to the Managers (crop 0 of an image is its base)."""
        is_base = torch.tensor([crop == 0 for n in crops_per_image for crop in range(n)], device=device)
        return managed_by_grid(self.config.grid, is_base)

    def _vision_residual(self, layer_stack: torch.Tensor, crops_per_image: list[int]) -> torch.Tensor:
        """injection="projector": zero-init residual in SigLIP space, on the managed crops. -> (crops, P, C)"""
        layers = self.stack.embed_layers(layer_stack, reuse_input=True)  # (crops, P, N, C); our own copy of the layers
        residual = self.stack.managers[0](layers)  # (crops, P, C)
        if self.config.grid != "all":
            managed = self._crop_is_managed(crops_per_image, residual.device)
            residual = residual * managed[:, None, None].to(residual.dtype)
        return residual

    def _pack(self, main, layer_stack, crops_per_image, image_sizes, *, max_crops, square):
        """Pack per image. main: (crops, P, D) projected -> [(T_i, D)]; layer_stack: (crops, P, N, C) in SigLIP
        space -> [(T_i, N * D)] projected, or None; and the (T, N * D) tensor those are row blocks of, or None."""
        config = self.llava_model.config
        newline = None if square else self.llava_model.image_newline
        sizes = [tuple(int(v) for v in (size.tolist() if torch.is_tensor(size) else size)) for size in image_sizes]
        layout = {
            "grid_pinpoints": config.image_grid_pinpoints,
            "crop_pixels": config.vision_config.image_size,
            "max_crops": max_crops,
            "unpad_mode": self.layout.unpad,
            "square": square,
        }
        packed_main = [
            pack_image(features, size, newline=newline, **layout)  # (T_i, D)
            for features, size in zip(torch.split(main, crops_per_image, dim=0), sizes)
        ]
        if layer_stack is None:
            return packed_main, None, None
        return packed_main, *self._pack_layers(layer_stack, crops_per_image, sizes, newline, layout)

    def _project_layers(self, layer_features: torch.Tensor) -> torch.Tensor:
        """(..., N, C) SigLIP features -> (..., N, D): the model's own projector, then the layer embedding."""
        projected = self.llava_model.multi_modal_projector(layer_features)
        return self.stack.embed_layers(projected, reuse_input=True)  # the projector's output is ours alone

    def _pack_layers(self, layer_stack, crops_per_image, sizes, newline, layout):
        """(crops, P, N, C) SigLIP features -> per image (T_i, N * D) projected features laid out like the main
        feature (newline rows: `image_newline` in every layer; rows outside the `grid` span: zero), and the
        (T, N * D) tensor whose consecutive row blocks they are (None when packed image by image).

        Unless the `anyres_max` shrink blends tokens, packing only copies them and the projector works token by
        token, so gathering and projecting commute. When the layout drops rows (unpadding; for `grid="base"|"grid"`
        every token outside the span) the kept rows are gathered first and only they are projected; otherwise all rows
        are projected and the narrower projected rows are gathered. Either way the gather is one indexing call over
        the whole batch, straight into the token-major layout the Managers read; the per-image outputs are consecutive
        row blocks of one tensor.
        """
        crops, tokens, num_layers, _width = layer_stack.shape
        sources = [
            token_sources(n, tokens, size, with_newline=newline is not None, **layout)
            for n, size in zip(crops_per_image, sizes)
        ]
        if any(source is None for source in sources):
            projected = self._project_layers(layer_stack)  # (crops, P, N, D)
            return self._pack_layers_as_channels(projected, crops_per_image, sizes, newline, layout), None
        first_rows = [0]
        for n in crops_per_image[:-1]:
            first_rows.append(first_rows[-1] + n * tokens)
        rows = torch.cat(
            [torch.where(s < 0, s, s + first) for s, first in zip(sources, first_rows)]
        )  # (T,), -1: newline
        is_newline = rows < 0
        position = torch.cat([torch.arange(s.shape[0]) for s in sources])  # index of each token within its image
        managed = managed_by_grid(self.config.grid, position < tokens)  # an image's base tokens come first
        keep = managed & ~is_newline  # the tokens that copy a crop row
        kept_rows = rows[keep]  # (T_kept,)

        device = layer_stack.device
        crop_rows = layer_stack.reshape(crops * tokens, num_layers, layer_stack.shape[-1])  # (crops * P, N, C)
        every_token_managed = bool(managed.all())
        if every_token_managed and torch.equal(rows, torch.arange(crops * tokens)):
            features = self._project_layers(crop_rows)  # one crop per image, no newline (square): no gather
        elif every_token_managed and kept_rows.shape[0] == crops * tokens:  # every crop row is used: project them
            # all, then gather the narrower D-wide rows; a newline row takes a stand-in row, overwritten below
            features = self._project_layers(crop_rows).index_select(0, rows.clamp(min=0).to(device))  # (T, N, D)
        else:  # unpadding or the grid span drops rows: project only the kept ones, then place them
            projected = self._project_layers(crop_rows.index_select(0, kept_rows.to(device)))  # (T_kept, N, D)
            features = projected.new_zeros(rows.shape[0], num_layers, projected.shape[-1])
            features = features.index_copy(0, keep.nonzero().squeeze(1).to(device), projected)  # (T, N, D)
        if newline is not None:
            newline_rows = (is_newline & managed).to(device)
            features[newline_rows] = newline.to(features.dtype)
        features = features.view(-1, num_layers * features.shape[-1])  # (T, N * D)
        return list(features.split([s.shape[0] for s in sources], dim=0)), features

    def _pack_layers_as_channels(self, layer_stack, crops_per_image, sizes, newline, layout) -> list[torch.Tensor]:
        """The bilinear-shrink case: each image's N projected layers `(crops, P, N, D)` folded into channels, packed
        like the main feature."""
        crops, tokens, num_layers, width = layer_stack.shape
        if newline is not None:
            newline = newline.to(layer_stack.dtype).repeat(num_layers)  # (N * D,)
        packed = []
        for features, size in zip(torch.split(layer_stack, crops_per_image, dim=0), sizes):
            folded = features.reshape(features.shape[0], tokens, num_layers * width)  # (crops_i, P, N * D)
            layers = pack_image(folded, size, newline=newline, **layout)  # (T_i, N * D)
            if self.config.grid != "all":
                layers = layers * self._token_is_managed(layers.shape[0], tokens, layers)
            packed.append(layers)
        return packed

    def _token_is_managed(self, num_tokens: int, base_tokens: int, like: torch.Tensor) -> torch.Tensor:
        """(T_i, 1) 0/1 factor: the base crop's tokens come first, everything after belongs to the grid."""
        is_base = torch.arange(num_tokens, device=like.device) < base_tokens
        return managed_by_grid(self.config.grid, is_base)[:, None].to(like.dtype)


def managed_by_grid(grid: str, is_base: torch.Tensor) -> torch.Tensor:
    """Which crops or tokens the `grid` setting gives to the Managers (the one place that knows the span).

    Args:
        grid (`str`): `"all"` (every crop and token), `"base"` (the base crop's) or `"grid"` (the AnyRes grid's, its
            newline tokens included).
        is_base (`torch.Tensor` of bool): per crop or token, whether it belongs to the image's base crop.

    Returns:
        `torch.Tensor` of bool, the shape of `is_base`.
    """
    if grid == "all":
        return torch.ones_like(is_base)
    return is_base if grid == "base" else ~is_base
