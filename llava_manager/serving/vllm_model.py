"""`LlavaOnevisionManagerForConditionalGeneration` for vLLM: LLaVA-OV with static Managers.

vLLM's own LLaVA-OV (processing, SigLIP tower, projector, Qwen2) with the Managers added the way vLLM's Qwen3-VL adds
its deepstack features:

- Tower side (`embed_multimodal`): one SigLIP pass returns the selected layers with the main one
  (`select_layers`); llava-manager's own packing (`features.ImageFeatureComputer._pack`, the code the transformers
  model runs) lays them out like the image tokens; each Manager's output for LLM layer k is computed there (static
  Managers read no LLM state). The output for layer 0 is added to the image embedding itself (adding before layer 0
  is adding to the input embeddings); the others ride with it as extra channels, `(tokens, (1 + E) * D)` per image,
  so vLLM's encoder cache, chunked prefill and prefix caching slice them with the image tokens.
- LLM side (`embed_input_ids`): the extra channels are scattered to their token positions and copied into one
  persistent zero-filled buffer `(E, max_num_batched_tokens, D)` made with the model (fixed address, the model's
  device and dtype; never None, so a compiled graph never specialises to "no Managers"); a forward pre-hook on
  decoder layer k adds its slot to the hidden state (vLLM's decoder layers carry `hidden + residual`; adding to
  `hidden` adds to the stream); `forward` zeroes the used rows afterwards.

Adaptive Managers read the instruction's hidden states around the image, which vLLM's chunked prefill and prefix
caching do not keep together: they are refused at load (serve them with transformers' `generate`). Pipeline
parallelism is refused (the hooks assume every Manager layer on one rank); tensor parallelism needs nothing (the
hidden state is whole between layers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import LlavaOnevisionProcessor
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import _require_is_multimodal
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionForConditionalGeneration as _VllmLlavaOnevision,
)
from vllm.model_executor.models.utils import WeightsMapper, _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.processing import PromptReplacement

from ..config import ImageLayout, ManagerConfig
from ..errors import ManagerError
from ..features import ImageFeatureComputer
from ..managers import ManagerStack
from ..packing import parse_max_crops
from ..video import pooled_layer_features

_TOWER_PARTS = r"(embeddings|encoder|post_layernorm|head)"


def _manager_config(hf_config) -> ManagerConfig | None:
    saved = getattr(hf_config, "manager", None)
    return ManagerConfig.from_dict(saved).resolve(hf_config) if saved else None


def check_servable(manager: ManagerConfig | None, vllm_config: VllmConfig) -> None:
    """Refuse, with the alternative, what this model cannot serve exactly."""
    if manager is None:
        return
    if manager.is_adaptive:
        raise ManagerError(
            f"manager_type {manager.manager_type!r}: adaptive Managers read the instruction's hidden states around "
            "each image, which vLLM's chunked prefill and prefix caching split across steps; vLLM serves static, "
            "bridge and tower Managers only. Serve this checkpoint with transformers' generate "
            "(llava_manager.from_pretrained, `llava-manager chat`)."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ManagerError(
            "pipeline parallelism is not supported for Manager checkpoints (the Managers' additions assume every "
            "decoder layer on one rank); use tensor parallelism (--tensor-parallel-size) instead."
        )


class LlavaOnevisionManagerProcessingInfo(LlavaOnevisionProcessingInfo):
    """vLLM's LLaVA-OV processing info, with the image-token count of the checkpoint's own processor.

    vLLM counts AnyRes tokens with its own copy of transformers' arithmetic, fixed to `anyres_max_9` and rounding
    unpad; the processor saved with the checkpoint (transformers' or llava-manager's layout-aware one) knows the
    checkpoint's `vision_aspect_ratio` and `image_layout`, so the count comes from it (single-image prompts)."""

    def get_hf_processor(self, **kwargs: object):
        # a tuple: vLLM then loads the saved processor through AutoProcessor (llava-manager's layout-aware class when
        # the checkpoint has it) instead of instantiating transformers' LlavaOnevisionProcessor from its files
        return self.ctx.get_hf_processor((LlavaOnevisionProcessor,), **kwargs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        processor = self.get_hf_processor()
        count = getattr(processor, "_get_number_of_features", None)
        if count is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        crop = self.get_hf_config().vision_config.image_size
        tokens = count(image_height, image_width, crop, crop)
        if processor.vision_feature_select_strategy == "default":
            tokens -= 1
        return tokens

    def get_num_image_tokens_in_multi_image_prompt(self) -> int:
        """transformers' count for an image among several in one prompt: its base crop and one newline (square
        layout: the crop alone)."""
        processor = self.get_hf_processor()
        tokens = processor.num_image_tokens
        if ImageLayout.from_dict(getattr(self.get_hf_config(), "image_layout", None)).mode != "square":
            tokens += 1
        if processor.vision_feature_select_strategy == "default":
            tokens -= 1
        return tokens


class LlavaOnevisionManagerMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    """vLLM's LLaVA-OV processor, with transformers' multi-image prompts.

    transformers gives an image in a prompt with several images its base crop only (and one newline); vLLM's
    LLaVA-OV gives every image its whole AnyRes grid. Here, as in transformers: the images of a multi-image prompt
    go to the processor as one sample (one crop each, as it prepares them) and get the matching token count. The same
    image alone in a prompt is a different item, so such items get their own cache identity (hash), and
    multi-image prompts are processed whole (vLLM's processing cache would otherwise process the missing items of a
    prompt on their own, without knowing they share it)."""

    def _get_mm_hashes(self, inputs):
        hashes = dict(super()._get_mm_hashes(inputs))
        images = hashes.get("image") or []
        if len(images) > 1:
            algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
            hashes["image"] = [
                MultiModalHasher.hash_kwargs(algorithm, mm_hash=mm_hash, multi_image_sample=True) for mm_hash in images
            ]
        return hashes

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        if inputs.mm_data_items.get_count("image", strict=False) > 1:
            return self._apply_hf_processor(inputs, timing_ctx)
        return super()._cached_apply_hf_processor(inputs, timing_ctx)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        if mm_items.get_count("image", strict=False) <= 1:
            return super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if mm_items.get_count("video", strict=False) > 0:
            # vLLM's LLaVA-OV processes the images of a prompt with videos on their own, one grid per image
            raise ManagerError(
                "a prompt with several images and a video is not supported by the vLLM model (transformers lays "
                "such images out as one sample, vLLM's LLaVA-OV processing cannot); send the video in its own "
                "prompt, or use transformers' generate"
            )
        hf_data, hf_kwargs, passthrough_data = self._get_hf_mm_inputs(mm_items, hf_kwargs)
        # nested: the images are one sample's (a flat list would be one sample per image, each with its grid)
        hf_data = {**hf_data, "images": [list(hf_data["images"])]}
        processed = self.info.ctx.call_hf_processor(self.info.get_hf_processor(**hf_kwargs), hf_data, hf_kwargs)
        return self._finalize_hf_mm_data(hf_data, hf_kwargs, passthrough_data, processed)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if mm_items.get_count("image", strict=False) <= 1:
            return updates
        image_token_id = self.info.get_hf_config().image_token_index
        tokens = [image_token_id] * self.info.get_num_image_tokens_in_multi_image_prompt()
        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=tokens)
            if update.modality == "image"
            else update
            for update in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionManagerMultiModalProcessor,
    info=LlavaOnevisionManagerProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class LlavaOnevisionManagerForConditionalGeneration(_VllmLlavaOnevision):
    """vLLM's LLaVA-OV plus the Managers of a llava-manager checkpoint (see the module docstring)."""

    hf_to_vllm_mapper = WeightsMapper(
        # transformers 5 saves SigLIP without its `vision_model.` level (`vision_tower.embeddings.*`); vLLM's tower has it
        orig_to_new_regex={
            re.compile(rf"^(model\.)?vision_tower\.{_TOWER_PARTS}\."): r"vision_tower.vision_model.\2.",
        },
        orig_to_new_prefix={
            **_VllmLlavaOnevision.hf_to_vllm_mapper.orig_to_new_prefix,
            "model.manager.": "manager.",
        },
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        manager_config = _manager_config(vllm_config.model_config.hf_config)
        check_servable(manager_config, vllm_config)  # before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.manager_config = manager_config
        self.layout = ImageLayout.from_dict(getattr(config, "image_layout", None))
        self.text_width = config.text_config.hidden_size
        stack = None
        if self.manager_config is not None:
            projector_space = self.manager_config.injection == "projector"
            stack = ManagerStack(
                self.manager_config, config.vision_config.hidden_size if projector_space else self.text_width
            )
            stack.eval()
        self.manager = stack
        # llava-manager's packing, run on this model's projector, newline and config (no hooks: vLLM's tower returns
        # the selected layers itself)
        self._packer = ImageFeatureComputer(self, stack, self.manager_config, self.layout, tower_hooks=False)
        self._check_tower_depth()
        self._folded, self._slots = self._plan_slots()
        self._manager_inputs = None  # (E, max tokens, D): the slots' additions for the tokens of this step
        self._used_tokens = 0
        if self._slots:
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            self._manager_inputs = torch.zeros(len(self._slots), max_tokens, self.text_width)
            layers = self.language_model.model.layers
            for slot, layer_index in enumerate(self._slots):
                layer = layers[layer_index]
                layer.register_buffer("manager_input", self._manager_inputs[slot], persistent=False)
                layer.register_forward_pre_hook(_add_manager_input)

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _check_tower_depth(self) -> None:
        built = len(self.vision_tower.vision_model.encoder.layers)
        deepest = max([self._packer.main_entry, *self._packer.vision_layers])
        if deepest > built:
            raise ManagerError(
                f"the Managers read SigLIP layer {deepest} but vLLM built the tower up to layer {built} "
                f"(vision_feature_layer={self.config.vision_feature_layer}); use vision_feature_layer=-1."
            )

    def _plan_slots(self) -> tuple[int | None, list[int]]:
        """(index of the Manager added to the image embedding (LLM layer 0) or None, the LLM layer of each other)."""
        if self.manager_config is None or self.manager_config.injection != "llm":
            return None, []
        layers = list(self.manager_config.llm_layers)
        folded = layers.index(0) if 0 in layers else None
        return folded, [layer for layer in layers if layer != 0]

    # ---- tower side -----------------------------------------------------------------------------------------
    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        """Per image `(tokens, (1 + E) * D)`: the image embedding (plus the layer-0 Manager), then E Manager slots."""
        if isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            raise ManagerError(
                "image_embeds inputs are not supported by Manager checkpoints (the Managers need the SigLIP layers); "
                "pass the image itself."
            )
        if self.manager_config is None:
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            side = self.config.vision_config.image_size
            image_sizes = torch.as_tensor([[side, side]] * len(pixel_values))
        square = self.layout.mode == "square"
        # an image among several in its prompt arrives as one crop (transformers' multi-image preprocessing)
        crops = [
            1 if images.shape[0] == 1 else n
            for images, n in zip(pixel_values, self._packer._crops_per_image(image_sizes, None, square))
        ]
        pixels = torch.cat([images[:n] for images, n in zip(pixel_values, crops)])  # (all crops, 3, H, W)
        return self._image_embeddings(pixels, crops, image_sizes, square)

    def _tower_layers(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SigLIP pass: (main `(crops, P, C)`, the N Manager layers `(crops, P, N, C)`)."""
        packer = self._packer
        num_layers = len(packer.vision_layers)
        hidden = self.vision_tower(
            pixels.to(self.multi_modal_projector.linear_1.weight.dtype),
            select_layers=[*packer.vision_layers, packer.main_entry],
            feature_select_strategy=self.config.vision_feature_select_strategy,
        )  # (crops, P, (N + 1) * C): the N Manager layers, then the main one
        width = hidden.shape[-1] // (num_layers + 1)
        layer_stack = hidden[..., : num_layers * width].unflatten(-1, (num_layers, width))
        return hidden[..., num_layers * width :], layer_stack

    def _with_manager_outputs(self, main: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """main `(T, D)`, layers `(T, N, D)` -> `(T, (1 + E) * D)`: main plus the layer-0 Manager, then the others."""
        outputs = [manager(layers).to(main.dtype) for manager in self.manager.managers]  # E (+ 1) x (T, D)
        if self._folded is not None:
            main = main + outputs[self._folded]
        extras = [out for index, out in enumerate(outputs) if index != self._folded]
        return torch.cat([main, *extras], dim=-1)

    def _image_embeddings(self, pixels, crops: list[int], image_sizes, square: bool) -> list[torch.Tensor]:
        packer = self._packer
        main, layer_stack = self._tower_layers(pixels)
        if self.manager_config.injection == "projector":
            main = main + packer._vision_residual(layer_stack.clone(), crops)
            layer_stack = None
        main = self.multi_modal_projector(main)  # (crops, P, D)
        max_crops = None if square else parse_max_crops(self.config.vision_aspect_ratio)
        packed_main, packed_layers, _ = packer._pack(
            main, layer_stack, crops, image_sizes, max_crops=max_crops, square=square
        )
        if packed_layers is None:
            return packed_main
        num_layers = len(packer.vision_layers)
        return [
            self._with_manager_outputs(image_main, image_layers.view(image_layers.shape[0], num_layers, -1))
            for image_main, image_layers in zip(packed_main, packed_layers)
        ]

    def _process_video_pixels(self, inputs):
        """Per video `(F * p + 1, (1 + E) * D)`, as llava_manager's video path (video.py): every selected layer
        projected, layer-embedded and pooled like the main feature; the newline slot holds `image_newline` in every
        layer. Checkpoints whose Managers skip video (`video: false`) get vLLM's video features and zero slots."""
        if self.manager_config is None or not self.manager_config.video:
            videos = super()._process_video_pixels(inputs)
            if not self._slots:
                return videos
            width = len(self._slots) * self.text_width
            return [torch.cat([v.reshape(-1, v.shape[-1]), v.new_zeros(v.shape[-2], width)], -1) for v in videos]
        video_pixels = inputs["pixel_values_videos"]  # (videos, F, 3, H, W) or per video (F, 3, H, W)
        frames = [len(video) for video in video_pixels]
        main, layer_stack = self._tower_layers(torch.cat(list(video_pixels)))  # (all frames, P, C), (.., P, N, C)
        stack = self.manager
        pooled_layers = None
        if self.manager_config.injection == "projector":
            main = main + stack.managers[0](stack.embed_layers(layer_stack.clone(), reuse_input=True))
        else:
            pooled_layers = pooled_layer_features(self, stack, layer_stack)  # (all frames, p, N, D)
        main = self.apply_pooling(self.multi_modal_projector(main))  # (all frames, p, D)
        newline = self.image_newline.to(main.dtype)
        embeddings = []
        for index, video_main in enumerate(main.split(frames)):
            video_main = torch.cat([video_main.flatten(0, 1), newline[None]])  # (F * p + 1, D)
            if pooled_layers is None:
                embeddings.append(video_main)
                continue
            layers = pooled_layers.split(frames)[index].flatten(0, 1)  # (F * p, N, D)
            layers = torch.cat([layers, newline.expand(1, layers.shape[1], -1)])  # (F * p + 1, N, D)
            embeddings.append(self._with_manager_outputs(video_main, layers))
        return embeddings

    # ---- LLM side -------------------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None) -> torch.Tensor:
        if not self._slots or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        width = self.text_width
        mains = [embedding[:, :width] for embedding in multimodal_embeddings]
        extras = [embedding[:, width:] for embedding in multimodal_embeddings]
        inputs_embeds = super().embed_input_ids(input_ids, mains, is_multimodal=is_multimodal)
        num_tokens = inputs_embeds.shape[0]
        scattered = _merge_multimodal_embeddings(
            inputs_embeds=inputs_embeds.new_zeros(num_tokens, len(self._slots) * width),
            multimodal_embeddings=extras,
            is_multimodal=_require_is_multimodal(is_multimodal),
        )  # (tokens, E * D), zero outside the image tokens
        self._set_manager_inputs(scattered.view(num_tokens, len(self._slots), width).transpose(0, 1))
        return inputs_embeds

    def _set_manager_inputs(self, manager_inputs: torch.Tensor) -> None:
        num_tokens = manager_inputs.shape[1]
        capacity = self._manager_inputs.shape[1]
        if num_tokens > capacity:
            raise RuntimeError(
                f"{num_tokens} tokens in one step, more than max_num_batched_tokens={capacity} that the Manager "
                "buffers were made for"
            )
        self._manager_inputs[:, :num_tokens].copy_(manager_inputs)
        self._used_tokens = num_tokens

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden_states = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if self._used_tokens:
            self._manager_inputs[:, : self._used_tokens].zero_()
            self._used_tokens = 0
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        if self.manager is not None:
            missing = sorted(f"manager.{name}" for name, _ in self.manager.named_parameters())
            missing = [name for name in missing if name not in loaded]
            if missing:
                raise ManagerError(
                    f"config.json declares Managers but the checkpoint lacks {len(missing)} of their tensors (e.g. "
                    f"model.{missing[0]}); the checkpoint is incomplete or not a llava-manager checkpoint"
                )
        return loaded


def _add_manager_input(layer: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a Manager's decoder layer: `hidden + manager_input` for this step's tokens."""
    positions, hidden_states, residual = args
    return positions, hidden_states + layer.manager_input[: hidden_states.shape[0]], residual
