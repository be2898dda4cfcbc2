"""A small synthetic LLaVA-format dataset of drawn shapes (no downloads): for the tiny recipe and the tests.

`write_shapes_dataset(folder, n)` writes `folder/images/*.png` and `folder/data.json` with single-image,
multi-image and text-only conversations in LLaVA's format, using only words the tiny tokenizer knows. The
kind "video" (not in the default mix) adds clips as folders of frames under `folder/videos/` (a shape
sliding left to right or back), marked `<image>` as LLaVA-Video's data does.
The content depends only on `n` and `seed`, and files are written atomically, so several ranks may
call it at once.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from .shapes import COLORS, SHAPES, fill_shape

SIZES = ((32, 32), (64, 32), (32, 64), (64, 64), (48, 40), (40, 72))
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
KINDS = ("single", "multi", "text")
VIDEO_FRAMES = 4


def draw_shape(shape: str, color: str, size: tuple[int, int], background=(245, 245, 245), where: float = 0.5):
    """A PIL image (width, height) = size with one filled shape, its centre at `where` of the free width
    (0 = left edge, 0.5 = the middle, 1 = right edge)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", (width, height), background)
    side = min(width, height) * 0.7
    fill_shape(ImageDraw.Draw(image), shape, (width - side) * where, (height - side) / 2, side, COLORS[color])
    return image


def video_frames(shape: str, color: str, size: tuple[int, int], rightward: bool, frames: int = VIDEO_FRAMES):
    """PIL frames of `shape` sliding across the picture (left to right when `rightward`)."""
    steps = [k / (frames - 1) for k in range(frames)]
    return [draw_shape(shape, color, size, where=w if rightward else 1 - w) for w in steps]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def shapes_records(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> tuple[list[dict], dict[str, tuple]]:
    """`n` LLaVA records cycling through `kinds`, and the images they need: {file name: (shape, color, size)}
    (a video's entry: {"ID/": (shape, color, size, rightward)})."""
    rng = random.Random(seed)
    records, images = [], {}
    for index in range(n):
        kind = kinds[index % len(kinds)]
        sample_id = f"shapes-{index:05d}"
        if kind == "video":
            shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
            rightward = rng.random() < 0.5
            images[f"{sample_id}/"] = (shape, color, size, rightward)
            records.append(
                {
                    "id": sample_id,
                    "video": sample_id,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat shape is in the picture?"},
                        {"from": "gpt", "value": f"A {color} {shape}."},
                    ],
                }
            )
            continue
        if kind == "text":
            a, b = rng.randrange(0, 6), rng.randrange(0, 5)
            records.append(
                {
                    "id": sample_id,
                    "conversations": [
                        {"from": "human", "value": f"What is {NUMBERS[a]} and {NUMBERS[b]}?"},
                        {"from": "gpt", "value": f"{NUMBERS[a + b].capitalize()}."},
                    ],
                }
            )
            continue
        count = 1 if kind == "single" else 2
        names, drawn = [], []
        for k in range(count):
            shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
            name = f"{sample_id}-{k}.png"
            images[name] = (shape, color, size)
            names.append(name)
            drawn.append((shape, color))
        if kind == "single":
            shape, color = drawn[0]
            question, answer = "What color is the shape?", f"The {shape} is {color}."
            if rng.random() < 0.5:
                question, answer = "What shape is in the image?", f"A {color} {shape}."
            records.append(
                {
                    "id": sample_id,
                    "image": names[0],
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": sample_id,
                    "image": names,
                    "conversations": [
                        {"from": "human", "value": "<image>\n<image>\nWhat color is the shape in the right image?"},
                        {"from": "gpt", "value": f"{drawn[1][1].capitalize()}."},
                        {"from": "human", "value": "And in the left image?"},
                        {"from": "gpt", "value": f"{drawn[0][1].capitalize()}."},
                    ],
                }
            )
    return records, images


def write_shapes_dataset(folder: str | os.PathLike, n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> Path:
    """Write `n` samples (images under `folder/images`, video frames under `folder/videos/ID/`) and return the
    path of `folder/data.json`."""
    folder = Path(folder)
    records, images = shapes_records(n, seed, kinds)
    for name, (shape, color, size, *motion) in images.items():
        if motion:  # a video: one PNG per frame
            for k, frame in enumerate(video_frames(shape, color, size, rightward=motion[0])):
                target = folder / "videos" / name / f"frame_{k:03d}.png"
                if not target.exists():
                    _atomic_write(target, lambda tmp, f=frame: f.save(tmp, format="PNG"))
            continue
        target = folder / "images" / name
        if not target.exists():
            _atomic_write(target, lambda tmp, s=shape, c=color, z=size: draw_shape(s, c, z).save(tmp, format="PNG"))
    data_file = folder / "data.json"
    text = json.dumps(records, indent=1)
    if not data_file.exists() or data_file.read_text() != text:
        _atomic_write(data_file, lambda tmp: Path(tmp).write_text(text))
    return data_file
