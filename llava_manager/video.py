"""Video features of a patched model: transformers' video path plus the Managers' multi-layer features.

`VideoFeatureComputer.__call__` stands in for `LlavaOnevisionModel.get_video_features` (same signature, so
`generate()` calls it before prefill as it calls the original). Per video of `F` frames:

    frames (F, 3, H, W) -> SigLIP (one call for every frame of the batch; no AnyRes crops)
    main feature:  entry `vision_feature_layer` -> projector -> transformers' `apply_pooling`     (F * p, D)
    layer n:       entry `vision_layers[n]`     -> projector -> + layer embedding -> `apply_pooling` (F * p, D)
    + one newline slot after all frames: `image_newline` (main feature; in every layer, as the image path's newline
      rows hold it)

`apply_pooling` is the model's own method (a bilinear resize of the `s x s` patch grid to `ceil(s/2)`, so
`p = ceil(s/2)^2`: 196 for SigLIP at 384 px); the N layers go through it in one call, folded into channels (it is
linear and per channel, so this is the same as pooling each layer). `injection="projector"`: the vision-space
residual is added to every frame's feature before the projector, then the usual pooling.

Whether `get_video_features` appends the newline changed inside our transformers range (transformers PR #48894):
older releases append it in `forward`. `pooler_output` follows the installed version, so `forward` sees what it
expects; the Managers' features (`deepstack_features`, one `(F * p + 1, N * D)` tensor per video) always carry the
newline slot, since the video tokens always include it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .config import ManagerConfig
from .features import _whole
from .forward_state import ForwardScope
from .managers import ManagerStack
from .vision import VisionCapture


@dataclass
class ManagerVideoOutput(BaseModelOutputWithPooling):
    """`get_video_features` output of a patched model.

    pooler_output (`torch.Tensor`): `(videos, F * p [+ 1], D)` main features, as the installed transformers returns
        them (with the newline from the release that appends it in `get_video_features`).
    deepstack_features (`list[list[torch.Tensor]]`): `[[per video (F * p + 1, N * D)]]`, the Managers' multi-layer
        features in video-token order, newline slot included; None with `injection="projector"`.
    """

    deepstack_features: list | None = None


def newline_in_video_features(llava_model) -> bool:
    """Whether the installed transformers' `get_video_features` appends `image_newline` (PR #48894) or leaves it to
    `forward` (older 5.x)."""
    source = inspect.getsource(type(llava_model).get_video_features)
    return "image_newline" in source


def pooled_layer_features(model, stack: ManagerStack, layer_stack: torch.Tensor) -> torch.Tensor:
    """(frames, P, N, C) SigLIP features -> (frames, p, N, D): `model`'s projector, the layer embedding, then
    `model.apply_pooling` (transformers' or vLLM's LLaVA-OV: a bilinear resize of the patch grid, channel by channel,
    so the N layers ride along as channels)."""
    projected = stack.embed_layers(model.multi_modal_projector(layer_stack), reuse_input=True)  # (frames, P, N, D)
    frames, _patches, num_layers, width = projected.shape
    pooled = model.apply_pooling(projected.reshape(frames, -1, num_layers * width))  # (frames, p, N * D)
    return pooled.reshape(frames, -1, num_layers, width)


class VideoFeatureComputer:
    """Callable that replaces `get_video_features` on one patched `LlavaOnevisionModel` instance."""

    def __init__(self, llava_model, stack: ManagerStack, config: ManagerConfig, scope: ForwardScope, capture):
        self.llava_model = llava_model
        self.stack = stack
        self.config = config
        self.scope = scope
        self.capture: VisionCapture = capture  # the image path's hooks: the same tower, the same entries
        model_config = llava_model.config
        self.main_entry = model_config.vision_feature_layer % (model_config.vision_config.num_hidden_layers + 1)
        self.appends_newline = newline_in_video_features(llava_model)

    # The signature mirrors transformers' get_video_features: generate() inspects it to pick its kwargs.
    def __call__(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> ManagerVideoOutput | tuple:
        model = self.llava_model
        config = model.config
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(config, "return_dict", True)
        if vision_feature_layer is not None and vision_feature_layer != config.vision_feature_layer:
            raise ValueError(
                f"a patched model computes its features from vision_feature_layer={config.vision_feature_layer}; "
                f"got vision_feature_layer={vision_feature_layer!r} at call time"
            )
        select_strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)}: expected (videos, frames, 3, H, W)"
            )
        videos, frames = pixel_values_videos.shape[:2]
        with self.capture.capture() as captured:
            tower_output = model.vision_tower(pixel_values_videos.flatten(0, 1), return_dict=True, **kwargs)
        main = captured[self.main_entry]  # (videos * F, P, C)
        layer_stack = torch.stack([captured[entry] for entry in self.config.vision_layers], dim=2)  # (V*F, P, N, C)
        captured.clear()
        if select_strategy == "default":
            main, layer_stack = main[:, 1:], layer_stack[:, 1:]

        layer_features = None
        if self.config.injection == "projector":
            main = main + self.stack.managers[0](self.stack.embed_layers(layer_stack, reuse_input=True))
        else:
            layer_features = self._pooled_layers(layer_stack, videos, frames)  # (V, F * p, N, D)
        main = model.apply_pooling(model.multi_modal_projector(main))  # (V * F, p, D)
        main = main.reshape(videos, -1, main.shape[-1])  # (V, F * p, D)
        with _whole(model.image_newline):
            newline = model.image_newline.to(main.dtype)  # (D,)
            if self.appends_newline:
                main = torch.cat([main, newline.expand(videos, 1, -1).to(main.device)], dim=1)
            deepstack = None
            if layer_features is not None:
                with_newline = torch.cat(
                    [layer_features, newline.to(layer_features.dtype).expand(videos, 1, layer_features.shape[2], -1)],
                    dim=1,
                )  # (V, F * p + 1, N, D)
                deepstack = [list(with_newline.flatten(2).unbind(0))]  # per video (F * p + 1, N * D)
        output = ManagerVideoOutput(
            last_hidden_state=tower_output.last_hidden_state,
            pooler_output=main,
            hidden_states=tower_output.hidden_states,
            attentions=tower_output.attentions,
            deepstack_features=deepstack,
        )
        state = self.scope.current()
        if state is not None:  # inside a forward: the injection hooks read it from there
            state.video_output = output
        return output if return_dict else output.to_tuple()

    def _pooled_layers(self, layer_stack: torch.Tensor, videos: int, frames: int) -> torch.Tensor:
        """(V * F, P, N, C) SigLIP features -> (V, F * p, N, D): projected, layer embedding added, pooled."""
        pooled = pooled_layer_features(self.llava_model, self.stack, layer_stack)  # (V * F, p, N, D)
        return pooled.reshape(videos, -1, *pooled.shape[2:])

    def remove(self) -> None:  # the hooks belong to the image path's capture
        pass
