"""Keeping DeepSpeed ZeRO-3 ranks in step outside training: inference forwards and `generate()`.

Under ZeRO-3 every module forward gathers its weights with a collective, so all ranks must run the same modules in the
same order. When one rank's batch has an image and another's has none, the image-less rank would skip the vision
tower, the projector, the layer embedding and the `image_newline` gather, and both ranks would hang. Training avoids
it with a masked blank image in every batch (the collator). Here an image-less rank runs the image path on one blank
image and drops the result (`idle_image_features`), at the point where the other ranks encode theirs:

- inside `generate()` (transformers >= 5.2x encodes images before the first forward, `mm_encoder_outputs`): before
  generation starts (`LlavaOnevisionManagerForConditionalGeneration.generate`);
- inside a forward (older transformers, or a forward called directly): before the language model, where transformers
  has just encoded the other ranks' images (`injection.LLMInjection`).

Videos too, inside `generate()` on transformers that pre-encode (5.2x: images first, then videos, before the first
forward): the ranks first agree on which media any of them has (`media_across_ranks`), then a rank without images
idles one before its own encoding and a rank without videos idles a one-frame blank video after it
(`LlavaOnevisionManagerForConditionalGeneration._prepare_multimodal_encoder_kwargs_for_generation`), so every rank
runs image path then video path. A plain forward (no `generate()`) keeps only images in step.
"""

from __future__ import annotations

import torch


def in_multi_rank_zero3(model) -> bool:
    """True when `model`'s weights are ZeRO-3-partitioned and more than one process takes part."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def idle_image_features(llava_model) -> None:
    """Run the patched `get_image_features` on one blank image of one crop size and drop its output."""
    config = llava_model.config
    size = config.vision_config.image_size
    image_sizes = torch.tensor([[size, size]])
    computer = llava_model.get_image_features
    square = computer.layout.mode == "square"
    crops = computer._crops_per_image(image_sizes, None, square)[0]
    reference = next(llava_model.vision_tower.parameters())
    pixel_values = torch.zeros(1, crops, 3, size, size, device=reference.device, dtype=reference.dtype)
    state = computer.scope.current() if computer.scope is not None else None
    kept = state.image_output if state is not None else None
    with torch.no_grad():
        computer(pixel_values, image_sizes.to(reference.device))
    if state is not None:
        state.image_output = kept  # the blank image's features are nobody's


def media_across_ranks(model, has_images: bool, has_videos: bool) -> tuple[bool, bool]:
    """(some rank has images, some rank has videos): a collective, every rank calls it at the same point."""
    import torch.distributed as dist

    reference = next(model.parameters())
    flags = torch.tensor([int(has_images), int(has_videos)], device=reference.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def idle_video_features(llava_model) -> None:
    """Run the patched `get_video_features` on one blank one-frame video and drop its output (the tower and every
    module of the video path run once whatever the frame count, as the training collator's blank video relies on)."""
    size = llava_model.config.vision_config.image_size
    reference = next(llava_model.vision_tower.parameters())
    pixel_values_videos = torch.zeros(1, 1, 3, size, size, device=reference.device, dtype=reference.dtype)
    computer = llava_model.get_video_features
    state = computer.scope.current() if getattr(computer, "scope", None) is not None else None
    kept = state.video_output if state is not None else None
    with torch.no_grad():
        computer(pixel_values_videos)
    if state is not None:
        state.video_output = kept  # the blank video's features are nobody's
