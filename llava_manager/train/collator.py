"""Batches of encoded samples, padded on the right, with one rule for ZeRO-3 safety.

**Every batch carries at least one image.** Under ZeRO-3 each module's parameters are gathered by a
collective call when the module runs, so all ranks must run the same modules in the same order. A
rank whose batch is text-only would skip the vision tower, the projector and the Managers' vision
path while another rank runs them, and both would hang. The original LLaVA code feeds a dummy
zero image to text-only samples and splices in none of its features; transformers' LLaVA-OV checks
that image features and image tokens match, so here the dummy image gets its image tokens appended
to the shortest row *after* its text, with `attention_mask = 0` and `labels = -100`: every module
runs (and gets a zero gradient), while the causal, masked positions change no real token's output.

**With video data, every batch also carries at least one video**, for the same reason (the video path runs
the vision tower, the projector and the Managers a second time): a batch without one gets a one-frame
blank dummy video, appended the same way. Real videos all have the recipe's frame count (see `data.py`),
so they stack into one `pixel_values_videos` tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import IGNORE_INDEX


class ManagerDataCollator:
    """Collates `SupervisedDataset` items.

    Args:
        pad_token_id (`int`): right-padding id for `input_ids`.
        image_token_id (`int`): the model's image token id (used for the dummy image).
        dummy_image (`dict`, *optional*): `{"pixel_values": (1, crops, 3, H, W), "image_sizes": (1, 2),
            "num_tokens": int}` for text-only batches; `None` disables the dummy (no ZeRO-3 safety).
        video_token_id (`int`, *optional*): the model's video token id (used for the dummy video).
        dummy_video (`dict`, *optional*): `{"pixel_values_videos": (1, 1, 3, H, W), "num_tokens": int}` for
            batches without a video when the data has videos; `None` = no dummy video.

    Returns (per batch): `input_ids`, `attention_mask`, `labels` (B, T); `pixel_values` (images, crops, 3, H, W)
    padded with zero crops, `image_sizes` (images, 2), `batch_num_images` (B,); `pixel_values_videos`
    (videos, frames, 3, H, W) in row order; `dropped_samples` (list of str).
    """

    def __init__(
        self,
        pad_token_id: int,
        image_token_id: int,
        dummy_image: dict | None = None,
        video_token_id: int | None = None,
        dummy_video: dict | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.dummy_image = dummy_image
        self.video_token_id = video_token_id
        self.dummy_video = dummy_video

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        attention = [torch.ones_like(ids) for ids in input_ids]
        pixel_values = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        image_sizes = [f["image_sizes"] for f in features if f.get("image_sizes") is not None]
        num_images = [0 if f.get("pixel_values") is None else f["pixel_values"].shape[0] for f in features]
        videos = [f["pixel_values_videos"] for f in features if f.get("pixel_values_videos") is not None]

        def append_masked(token_id: int, count: int) -> int:
            """Append `count` masked, unlabelled `token_id`s to the shortest row; returns the row."""
            row = min(range(len(features)), key=lambda i: input_ids[i].numel())
            input_ids[row] = torch.cat([input_ids[row], torch.full((count,), token_id, dtype=torch.long)])
            labels[row] = torch.cat([labels[row], torch.full((count,), IGNORE_INDEX, dtype=torch.long)])
            attention[row] = torch.cat([attention[row], torch.zeros(count, dtype=attention[row].dtype)])
            return row

        if not pixel_values and self.dummy_image is not None:
            num_images[append_masked(self.image_token_id, self.dummy_image["num_tokens"])] = 1
            pixel_values = [self.dummy_image["pixel_values"]]
            image_sizes = [self.dummy_image["image_sizes"]]
        if not videos and self.dummy_video is not None:
            append_masked(self.video_token_id, self.dummy_video["num_tokens"])
            videos = [self.dummy_video["pixel_values_videos"]]

        length = max(ids.numel() for ids in input_ids)
        batch = {
            "input_ids": _pad(input_ids, length, self.pad_token_id),
            "attention_mask": _pad(attention, length, 0),
            "labels": _pad(labels, length, IGNORE_INDEX),
        }
        if pixel_values:
            max_crops = max(p.shape[1] for p in pixel_values)
            padded = [
                torch.cat([p, p.new_zeros(p.shape[0], max_crops - p.shape[1], *p.shape[2:])], dim=1)
                if p.shape[1] < max_crops
                else p
                for p in pixel_values
            ]
            batch["pixel_values"] = torch.cat(padded, dim=0)  # (images, crops, 3, H, W)
            batch["image_sizes"] = torch.cat(image_sizes, dim=0).long()  # (images, 2)
            batch["batch_num_images"] = torch.tensor(num_images, dtype=torch.long)  # (B,)
        if videos:
            frame_counts = sorted({v.shape[1] for v in videos})
            if len(frame_counts) > 1:
                raise ValueError(
                    f"videos with {frame_counts} frames in one batch: pixel_values_videos needs one frame count; "
                    "encode every video with the same video_frames"
                )
            batch["pixel_values_videos"] = torch.cat(videos, dim=0)  # (videos, frames, 3, H, W)
        batch["dropped_samples"] = [d for f in features for d in f.get("dropped", [])]
        return batch


def _pad(rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def make_dummy_image(encoder) -> dict:
    """A blank image of one crop's size, encoded like a real single image (crops and token count)."""
    from PIL import Image

    processor = encoder.processor
    size = processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    blank = Image.new("RGB", (width, height), (0, 0, 0))
    inputs = processor.image_processor([[blank]], return_tensors="pt")
    num_tokens = len(processor.replace_image_token(inputs, 0)) // len(processor.image_token)
    return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"], "num_tokens": num_tokens}


def make_dummy_video(encoder) -> dict:
    """A blank one-frame video of one crop's size, encoded like a real video (its token count included)."""
    import numpy as np

    processor = encoder.processor
    size = processor.video_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    inputs = processor.video_processor([np.zeros((1, height, width, 3), dtype=np.uint8)], return_tensors="pt")
    num_tokens = len(processor.replace_video_token(inputs, 0)) // len(processor.video_token)
    return {"pixel_values_videos": inputs["pixel_values_videos"], "num_tokens": num_tokens}
