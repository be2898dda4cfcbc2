"""The video demo's synthetic clips (`llava-manager demo --video`): one drawn shape per clip that slides to the
left or to the right, or stays where it is and changes colour halfway.

`write_clip_dataset(folder, n_train, n_heldout, seed)` draws every clip as a folder of PNG frames under
`folder/videos/` and writes two files in LLaVA-Video's conversation format (`{"video": ..., "conversations"}`,
the video marked `<image>` as LLaVA-Video's data marks it):

- `train.json`: one sample per training clip, a conversation asking every question that applies, in a random order;
- `heldout.json`: one sample per (held-out clip, question), a single question each, for scoring.

The questions need the frames in order: which way the shape moves (compare early and late frames), whether it
moves at all, and its colour at the end (a still clip shows another colour in its first half). Held-out clips
come from their own random stream. Answers are one word of the tiny tokenizer's vocabulary.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..testing.shapes import COLORS, SHAPES, fill_shape
from .shapes import DemoData

FRAMES = 6  # frames per clip (the recipe's frames_upbound is set to it)
CLIP_SIZE = (32, 32)  # (width, height): one crop of the demo model, 2 x 2 pooled tokens per frame
MOTIONS = ("left", "right", "still")
VIDEO_QUESTIONS = {
    "moves": "Does the shape move?",
    "direction": "Which way does the shape move, left or right?",
    "end_color": "What color is the shape at the end?",
}
VIDEO_CHANCE = {"moves": 1 / 2, "direction": 1 / 2, "end_color": 1 / len(COLORS)}


@dataclass(frozen=True)
class Clip:
    """What one clip shows. `motion`: the way the shape slides, or "still" (then its colour changes halfway)."""

    shape: str
    start_color: str
    end_color: str
    motion: str

    def questions(self) -> list[str]:
        return ["moves", "end_color"] + (["direction"] if self.motion != "still" else [])

    def answer(self, question_type: str) -> str:
        if question_type == "moves":
            return "no" if self.motion == "still" else "yes"
        if question_type == "direction":
            return self.motion
        return self.end_color


def draw_clip(clip: Clip, rng: random.Random, size: tuple[int, int] = CLIP_SIZE, frames: int = FRAMES) -> list:
    """PIL frames of `clip`: a plain, slightly shaded background; the shape slides from one edge to the other, or
    stays put and switches from `start_color` to `end_color` after the first half of the frames."""
    from PIL import Image, ImageDraw

    width, height = size
    shade = rng.randint(225, 250)
    side = rng.uniform(0.40, 0.50) * min(width, height)
    margin = 1.0
    top = rng.uniform(margin, height - margin - side)
    far = width - margin - side
    still_left = rng.uniform(margin, far)
    images = []
    for index in range(frames):
        progress = index / (frames - 1)
        left = {"right": margin + progress * (far - margin), "left": far - progress * (far - margin)}.get(
            clip.motion, still_left
        )
        color = clip.start_color if index < frames / 2 else clip.end_color
        image = Image.new("RGB", (width, height), (shade, shade, shade))
        fill_shape(ImageDraw.Draw(image), clip.shape, left, top, side, COLORS[color])
        images.append(image)
    return images


def _clips(count: int, rng: random.Random) -> list[Clip]:
    """`count` clips covering the motion x shape x colour combinations as evenly as possible."""
    combos = [(m, s, c) for m in MOTIONS for s in SHAPES for c in COLORS]
    clips: list[Clip] = []
    while len(clips) < count:
        batch = list(combos)
        rng.shuffle(batch)
        for motion, shape, color in batch:
            end = rng.choice([c for c in COLORS if c != color]) if motion == "still" else color
            clips.append(Clip(shape, color, end, motion))
    return clips[:count]


def _turns(clip: Clip, kinds: list[str]) -> list[dict]:
    turns = []
    for index, kind in enumerate(kinds):
        question = ("<image>\n" if index == 0 else "") + VIDEO_QUESTIONS[kind]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": clip.answer(kind)}]
    return turns


def write_clip_dataset(folder: str | Path, n_train: int = 480, n_heldout: int = 48, seed: int = 0) -> DemoData:
    """Draw `n_train` training and `n_heldout` held-out clips under `folder/videos`; write the two JSON files.
    The same seed gives the same files. Returns `DemoData` with `video_folder` set."""
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"need at least one training and one held-out clip (got {n_train} and {n_heldout})")
    folder = Path(folder)
    videos = folder / "videos"

    def save(name: str, clip: Clip, rng: random.Random) -> None:
        (videos / name).mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(draw_clip(clip, rng)):
            frame.save(videos / name / f"frame-{index:02d}.png")

    train_rng = random.Random(f"train-clips-{seed}")
    train = []
    for index, clip in enumerate(_clips(n_train, train_rng)):
        name = f"train-{index:04d}"
        save(name, clip, train_rng)
        order = clip.questions()
        train_rng.shuffle(order)
        train.append({"id": name, "video": name, "conversations": _turns(clip, order)})

    heldout_rng = random.Random(f"heldout-clips-{seed}")
    heldout = []
    for index, clip in enumerate(_clips(n_heldout, heldout_rng)):
        name = f"heldout-{index:04d}"
        save(name, clip, heldout_rng)
        for kind in clip.questions():
            heldout.append(
                {"id": f"{name}-{kind}", "video": name, "question_type": kind, "conversations": _turns(clip, [kind])}
            )

    train_json, heldout_json = folder / "train.json", folder / "heldout.json"
    train_json.write_text(json.dumps(train, indent=1))
    heldout_json.write_text(json.dumps(heldout, indent=1))
    return DemoData(folder, train_json, heldout_json, None, n_train, n_heldout, video_folder=videos)
