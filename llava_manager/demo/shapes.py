"""The demo's synthetic data: one drawn shape per image, questions about its colour, kind and position.

`write_demo_dataset(folder, n_train, n_heldout, seed)` draws the images with PIL and writes two files in
LLaVA's conversation format (the format `llava_manager.train` reads):

- `train.json`: one sample per training image, a conversation asking all three questions in a random order;
- `heldout.json`: one sample per (held-out image, question), a single question each, for scoring.

Held-out images come from their own random stream, so no held-out image is a training image; they follow
the same distribution (the same colours, shapes and positions, with fresh sizes, offsets and backgrounds).
Every word is in the tiny tokenizer's vocabulary (`llava_manager.testing.tiny`), and answers are one word.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..testing.shapes import COLORS, SHAPES, fill_shape

POSITIONS = ("left", "right")
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is in the image?",
    "position": "Is the shape on the left or the right?",
}
IMAGE_SIZE = (64, 64)  # (width, height): a 2x2 AnyRes grid of 32 px crops on the tiny model
SHAPE_SCALE = (0.40, 0.46)  # side of the shape / image height: large, so the colour is in many image tokens


@dataclass(frozen=True)
class DrawnShape:
    """What one image shows: the answers to the three questions."""

    color: str
    shape: str
    position: str

    def answer(self, question_type: str) -> str:
        return getattr(self, question_type)


@dataclass
class DemoData:
    """Where `write_demo_dataset` (images) or `clips.write_clip_dataset` (videos: `video_folder` set, no
    `image_folder`) put things."""

    folder: Path
    train_json: Path
    heldout_json: Path
    image_folder: Path | None
    n_train: int
    n_heldout: int
    video_folder: Path | None = None

    @property
    def is_video(self) -> bool:
        return self.video_folder is not None

    def media_path(self, sample: dict) -> Path:
        """The held-out sample's image file or clip folder."""
        return self.video_folder / sample["video"] if self.is_video else self.image_folder / sample["image"]

    def heldout_samples(self) -> list[dict]:
        return json.loads(self.heldout_json.read_text())


def draw(item: DrawnShape, rng: random.Random, size: tuple[int, int] = IMAGE_SIZE):
    """A PIL image of `item`: the shape in the left or right half of a plain, slightly noisy background."""
    from PIL import Image, ImageDraw

    width, height = size
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (width, height), (shade, shade, shade))
    pen = ImageDraw.Draw(image)
    side = rng.uniform(*SHAPE_SCALE) * min(width, height)
    half = width / 2
    margin = 2.0
    low = margin if item.position == "left" else half + margin
    left = rng.uniform(low, low + half - 2 * margin - side)
    top = rng.uniform(margin, height - margin - side)
    jitter = [max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[item.color]]
    fill_shape(pen, item.shape, left, top, side, tuple(jitter))
    return image


def _items(count: int, rng: random.Random) -> list[DrawnShape]:
    """`count` shapes covering the colour x shape x position combinations as evenly as possible."""
    combos = [DrawnShape(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]
    items: list[DrawnShape] = []
    while len(items) < count:
        batch = list(combos)
        rng.shuffle(batch)
        items += batch
    return items[:count]


def _answer_turns(item: DrawnShape, kinds: list[str], first_with_image: bool = True) -> list[dict]:
    turns = []
    for index, kind in enumerate(kinds):
        question = QUESTIONS[kind]
        if index == 0 and first_with_image:
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": item.answer(kind)}]
    return turns


def write_demo_dataset(
    folder: str | Path, n_train: int = 240, n_heldout: int = 24, seed: int = 0, size: tuple[int, int] = IMAGE_SIZE
) -> DemoData:
    """Draw `n_train` training and `n_heldout` held-out images under `folder/images`; write the two JSON files.

    Args:
        folder (`str` or `Path`): created if needed.
        n_train (`int`, *optional*, defaults to 240): training images (one 3-question conversation each).
        n_heldout (`int`, *optional*, defaults to 24): held-out images (three single-question samples each).
        seed (`int`, *optional*, defaults to 0): the same seed gives the same files.
        size (`tuple[int, int]`, *optional*): image (width, height) in pixels.

    Returns:
        `DemoData` with the paths.
    """
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"need at least one training and one held-out image (got {n_train} and {n_heldout})")
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    kinds = list(QUESTIONS)

    train_rng = random.Random(f"train-{seed}")
    train = []
    for index, item in enumerate(_items(n_train, train_rng)):
        name = f"train-{index:04d}.png"
        draw(item, train_rng, size).save(images / name)
        order = list(kinds)
        train_rng.shuffle(order)
        train.append({"id": f"train-{index:04d}", "image": name, "conversations": _answer_turns(item, order)})

    heldout_rng = random.Random(f"heldout-{seed}")
    heldout = []
    for index, item in enumerate(_items(n_heldout, heldout_rng)):
        name = f"heldout-{index:04d}.png"
        draw(item, heldout_rng, size).save(images / name)
        for kind in kinds:
            heldout.append(
                {
                    "id": f"heldout-{index:04d}-{kind}",
                    "image": name,
                    "question_type": kind,
                    "conversations": _answer_turns(item, [kind]),
                }
            )

    train_json, heldout_json = folder / "train.json", folder / "heldout.json"
    train_json.write_text(json.dumps(train, indent=1))
    heldout_json.write_text(json.dumps(heldout, indent=1))
    return DemoData(folder, train_json, heldout_json, images, n_train, n_heldout)
