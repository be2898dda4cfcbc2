"""LLaVA conversation data: loading, checking, and encoding with the model's own processor.

Input formats (as LLaVA-NeXT):

- a JSON list or JSONL file of samples
  `{"id", "image": str | [str], "video": str, "conversations": [{"from": "human" | "gpt", "value": str}, ...]}`;
  image paths are relative to the recipe's `image_folder`, the video (a file or a folder of frames, as
  LLaVA-Video) to its `video_folder`; `<image>` marks where each image goes, `<video>` where the video goes
  (a sample with a video and no images may mark it `<image>`, as LLaVA-Video's data does);
- a YAML mixture `datasets: [{json_path, sampling_strategy: all | first:N | first:N% | end:N | random:N,
  image_folder (optional), video_folder (optional)}]`.

`load_samples` reads and checks everything up front (structure, roles, placeholder counts against the
images and video, the files), so bad data fails before any process group starts, naming file, sample and key.
Every video is sampled to exactly `frames` frames when encoded (see `media.load_video`, `exact=True`).

`ConversationEncoder` renders a sample in Qwen ChatML (`qwen_1_5`: the loss is on each answer and the
`<|im_end|>` closing it) or LLaVA's `plain` caption format, expands every `<image>` to the number of
image tokens the processor counts for that image, and truncates at `model_max_length`. A sample whose
image tokens would be cut (or that has no answer token left) is dropped and counted, never trained on.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import chat_format
from ..errors import DataError, ManagerError  # noqa: F401  (DataError: re-exported)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = chat_format.IMAGE_PLACEHOLDER
VIDEO_PLACEHOLDER = chat_format.VIDEO_PLACEHOLDER
PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
TOKENS_PER_FRAME = 196  # LLaVA-OV: SigLIP's 27 x 27 patches pooled to 14 x 14 (only a length estimate here)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SAMPLING_STRATEGIES = ("all", "first", "end", "random")


class DropSample(Exception):
    """Raised by the encoder for a sample that must not be trained on; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Sample:
    """One checked conversation. `images` and `video` are resolved paths (the conversation marks the video
    `<video>`); `where` names the sample in messages; `video_frames` is what the video will be sampled to."""

    id: str
    conversations: list[dict[str, str]]
    images: list[str] = field(default_factory=list)
    where: str = ""
    video: str | None = None
    video_frames: int = 0

    @property
    def media(self) -> list[str]:
        return self.images + ([self.video] if self.video else [])

    @property
    def modality_length(self) -> int:
        """LLaVA's cheap length estimate: words (+ 128 per image, + the video's tokens); negative for text-only
        samples. A video's real token count is so much larger than an image's that videos sort together."""
        words = sum(len(turn["value"].split()) for turn in self.conversations)
        if not self.media:
            return -max(words, 1)
        return words + 128 * len(self.images) + (TOKENS_PER_FRAME * self.video_frames + 1 if self.video else 0)


# ---- reading ---------------------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"data file {path}, line {line_number}: not valid JSON ({error})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"data file {path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"data file {path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def _sample_records(records: list, strategy: Any, where: str, rng: random.Random) -> list:
    if not isinstance(strategy, str):
        raise DataError(f"{where}: sampling_strategy={strategy!r} is invalid: use all, first:N, end:N or random:N")
    name, _, number = strategy.partition(":")
    if name not in SAMPLING_STRATEGIES or (name == "all") != (number == ""):
        raise DataError(
            f"{where}: sampling_strategy={strategy!r} is invalid: use all, first:N, first:N%, end:N or random:N"
        )
    if name == "all":
        return records
    try:
        count = math.ceil(float(number[:-1]) * len(records) / 100) if number.endswith("%") else int(number)
    except ValueError:
        raise DataError(
            f"{where}: sampling_strategy={strategy!r}: {number!r} is not a count or a percentage"
        ) from None
    if count < 0:
        raise DataError(f"{where}: sampling_strategy={strategy!r}: the count must not be negative")
    if name == "first":
        return records[:count]
    if name == "end":
        return records[-count:] if count else []
    shuffled = list(records)
    rng.shuffle(shuffled)
    return shuffled[:count]


def _resolve(value: str, bases: list[Path]) -> Path:
    path = Path(value)
    if path.is_absolute():
        return path
    for base in bases:
        if (base / path).exists():
            return base / path
    return bases[0] / path


def data_sources(
    data_path: Path, image_folder: Path | None, seed: int, video_folder: Path | None = None
) -> list[tuple[Path, list, Path | None, Path | None]]:
    """[(file, records, image folder, video folder)] for a JSON/JSONL file or a YAML mixture."""
    if not data_path.is_file():
        raise DataError(f"data file {data_path} does not exist (recipe key 'data_path')")
    if data_path.suffix not in (".yaml", ".yml"):
        return [(data_path, _read_records(data_path), image_folder, video_folder)]
    try:
        mixture = yaml.safe_load(data_path.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"data mixture {data_path}: not valid YAML ({error})") from None
    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise DataError(f"data mixture {data_path}: expected `datasets:` with a non-empty list of entries")
    rng = random.Random(seed)
    sources = []
    for index, entry in enumerate(mixture["datasets"]):
        where = f"data mixture {data_path}, datasets[{index}]"
        if not isinstance(entry, dict) or "json_path" not in entry:
            raise DataError(
                f"{where}: each entry needs json_path (and optionally sampling_strategy, image_folder, video_folder)"
            )
        unknown = set(entry) - {"json_path", "sampling_strategy", "image_folder", "video_folder"}
        if unknown:
            raise DataError(
                f"{where}: unknown key(s) {sorted(unknown)}; use json_path, sampling_strategy, image_folder, "
                "video_folder"
            )
        file = _resolve(str(entry["json_path"]), [Path.cwd(), data_path.parent])
        if not file.is_file():
            raise DataError(f"{where}: json_path {entry['json_path']!r} does not exist (tried {file})")
        folders = {"image_folder": image_folder, "video_folder": video_folder}
        for key in folders:
            if entry.get(key) is not None:
                folders[key] = _resolve(str(entry[key]), [Path.cwd(), data_path.parent])
                if not folders[key].is_dir():
                    raise DataError(f"{where}: {key} {entry[key]!r} is not a folder (tried {folders[key]})")
        records = _sample_records(_read_records(file), entry.get("sampling_strategy", "all"), where, rng)
        sources.append((file, records, folders["image_folder"], folders["video_folder"]))
    return sources


def check_record(
    record: Any, file: Path, index: int, image_folder: Path | None, video_folder: Path | None = None
) -> Sample:
    """Structure, roles and placeholder counts of one record; returns a `Sample` or raises `DataError`."""
    where = f"{file}, sample {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    sample_id = str(record.get("id", f"#{index}"))
    where = f"{file}, sample {index} (id {sample_id!r})"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{k}] needs 'from' and 'value'")
        role = ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{k}].from={turn['from']!r} is invalid: use human or gpt")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: conversations[{k}].value must be a string")
        if role == "system" and k != 0:
            raise DataError(f"{where}: conversations[{k}]: a system turn may only come first")
        turns.append({"from": role, "value": turn["value"]})
    if not any(t["from"] == "assistant" for t in turns):
        raise DataError(f"{where}: no gpt turn, so nothing to train on")
    image = record.get("image")
    if image is None:
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and image and all(isinstance(i, str) for i in image):
        images = list(image)
    else:
        raise DataError(f"{where}: 'image' must be a path or a non-empty list of paths, got {image!r}")
    video = record.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise DataError(f"{where}: 'video' must be one path (a video file or a folder of frames), got {video!r}")
    _check_placeholders(turns, images, video, where)
    if any(PLACEHOLDERS.search(t["value"]) for t in turns if t["from"] != "user"):
        raise DataError(f"{where}: {IMAGE_PLACEHOLDER} and {VIDEO_PLACEHOLDER} may only appear in human turns")
    if images and image_folder is None:
        raise DataError(f"{where}: the sample has images but the recipe sets no image_folder")
    if video is not None and video_folder is None and not Path(video).is_absolute():
        raise DataError(f"{where}: the sample has a video but the recipe sets no video_folder")
    paths = [str(Path(p) if Path(p).is_absolute() else image_folder / p) for p in images]
    video_path = None if video is None else str(Path(video) if Path(video).is_absolute() else video_folder / video)
    return Sample(id=sample_id, conversations=turns, images=paths, where=where, video=video_path)


def _check_placeholders(turns: list[dict], images: list[str], video: str | None, where: str) -> None:
    """Placeholders against media; a video-only sample's one `<image>` becomes `<video>` (LLaVA-Video's data)."""
    image_marks = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    video_marks = sum(t["value"].count(VIDEO_PLACEHOLDER) for t in turns)
    if video is not None and not images and image_marks + video_marks == 1:
        for t in turns:
            t["value"] = t["value"].replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
        return
    if video is not None and not images:
        raise DataError(
            f"{where}: a sample with a video and no images needs exactly one {VIDEO_PLACEHOLDER} (or {IMAGE_PLACEHOLDER})"
            f" placeholder; the conversation has {image_marks + video_marks}"
        )
    if video_marks != (video is not None):
        have = "has a video" if video is not None else "has no 'video'"
        raise DataError(
            f"{where}: the conversation has {video_marks} {VIDEO_PLACEHOLDER} placeholder(s) but the sample {have}"
        )
    if image_marks != len(images):
        raise DataError(
            f"{where}: the conversation has {image_marks} {IMAGE_PLACEHOLDER} placeholder(s) but the sample has "
            f"{len(images)} image(s)"
        )


def _image_problem(path: str, mode: str) -> str | None:
    if not os.path.isfile(path):
        return "missing"
    if mode == "open":
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
            return f"unreadable ({type(error).__name__}: {error})"
    return None


@dataclass
class LoadedData:
    samples: list[Sample]
    skipped: list[str]  # "id: reason" of samples dropped because of their images or video (on_bad_*: skip)


def load_samples(
    data_path: Path,
    image_folder: Path | None,
    *,
    check_images: str = "exists",
    on_bad_image: str = "error",
    seed: int = 0,
    video_folder: Path | None = None,
    check_videos: str = "exists",
    on_bad_video: str = "error",
    video_frames: int = 32,
) -> LoadedData:
    """Read and check every sample (and, per `check_images` / `check_videos`, every image and video)."""
    samples: list[Sample] = []
    for file, records, images, videos in data_sources(data_path, image_folder, seed, video_folder):
        samples += [check_record(record, file, index, images, videos) for index, record in enumerate(records)]
    if not samples:
        raise DataError(f"data {data_path}: no samples")
    for sample in samples:
        sample.video_frames = video_frames if sample.video else 0
    kept, bad = [], []
    for sample in samples:
        problems = _media_problems(sample, check_images, check_videos)
        (bad.append((sample, problems)) if problems else kept.append(sample))
    for kind, action, key in (("image", on_bad_image, "on_bad_image"), ("video", on_bad_video, "on_bad_video")):
        failing = [(s, [(k, p, why) for k, p, why in problems if k == kind]) for s, problems in bad]
        failing = [(s, problems) for s, problems in failing if problems]
        if failing and action == "error":
            lines = [f"  {s.where}: {k} {p} is {why}" for s, problems in failing[:5] for k, p, why in problems[:1]]
            more = f"\n  ... and {len(failing) - 5} more" if len(failing) > 5 else ""
            raise DataError(
                f"{len(failing)} sample(s) have missing or unreadable {kind}s (set {key}: skip to drop them):\n"
                + "\n".join(lines)
                + more
            )
    skipped = [f"{s.id}: {problems[0][0]} {problems[0][1]} is {problems[0][2]}" for s, problems in bad]
    if not kept:
        raise DataError(f"data {data_path}: every sample was skipped for its images or video")
    return LoadedData(samples=kept, skipped=skipped)


def _media_problems(sample: Sample, check_images: str, check_videos: str) -> list[tuple[str, str, str]]:
    """[(kind, path, why)] for the sample's images and video, as far as the checks look."""
    from ..media import video_problem

    problems = []
    if check_images != "none":
        problems += [("image", p, _image_problem(p, check_images)) for p in sample.images]
    if check_videos != "none" and sample.video:
        problems.append(("video", sample.video, video_problem(sample.video, check_videos)))
    return [(kind, path, why) for kind, path, why in problems if why]


# ---- encoding --------------------------------------------------------------------------------------
class ConversationEncoder:
    """Turns a `Sample` into `input_ids`, `labels`, `pixel_values`, `image_sizes` (and `pixel_values_videos`)
    with the real processor.

    Args:
        processor: a `LlavaOnevisionProcessor` (or llava-manager's subclass) matched to the model.
        image_token_id (`int`): the model's image token id.
        conv_template (`str`): `"qwen_1_5"` or `"plain"`.
        system_prompt (`str`): the ChatML system message (a sample's own system turn wins).
        model_max_length (`int`): tokens per sample.
        video_token_id (`int`, *optional*): the model's video token id (needed for video samples).
        video_frames (`int`): frames every video is sampled to (exactly; short clips repeat frames).
    """

    def __init__(
        self,
        processor,
        image_token_id: int,
        conv_template: str,
        system_prompt: str,
        model_max_length: int,
        video_token_id: int | None = None,
        video_frames: int = 32,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.video_frames = video_frames
        self.conv_template = conv_template
        self.system_prompt = system_prompt
        self.model_max_length = model_max_length
        self._text_cache: dict[str, list[int]] = {}

    # segments: (text, trained) pairs; `<image>` inside a text is expanded later
    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        turns = [dict(t) for t in sample.conversations]
        if self.conv_template == "plain":
            answers = [t["value"] for t in turns if t["from"] == "assistant"]
            media = IMAGE_PLACEHOLDER * len(sample.images) + (VIDEO_PLACEHOLDER if sample.video else "")
            return [(media, False), (answers[0], True), ("\n", True)]
        if len(sample.media) == 1:  # as LLaVA: a single image (or video) goes first in its turn, then "\n"
            mark = VIDEO_PLACEHOLDER if sample.video else IMAGE_PLACEHOLDER
            for turn in turns:
                if mark in turn["value"] and not turn["value"].startswith(mark):
                    turn["value"] = mark + "\n" + turn["value"].replace(mark, "").strip()
        system = self.system_prompt
        if turns[0]["from"] == "system":
            system = turns.pop(0)["value"]
        segments = [(chat_format.turn("system", system), False)]
        for turn in turns:
            if turn["from"] == "user":
                segments.append((chat_format.turn("user", turn["value"]), False))
            else:  # the answer and its end marker are learned; the "\n" after it is not
                segments += [
                    (chat_format.header("assistant"), False),
                    (turn["value"], True),
                    (chat_format.IM_END, True),
                    ("\n", False),
                ]
        return segments

    def _tokens(self, text: str) -> list[int]:
        cached = self._text_cache.get(text)
        if cached is None:
            cached = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(text) < 64 and len(self._text_cache) < 10000:  # the fixed pieces of the template
                self._text_cache[text] = cached
        return cached

    def load_images(self, sample: Sample) -> list:
        from PIL import Image

        images = []
        for path in sample.images:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
                raise BadImage(sample, path, f"{type(error).__name__}: {error}") from None
        return images

    def load_video(self, sample: Sample):
        """`(video_frames, H, W, 3)` frames of the sample's video."""
        from ..errors import VideoError
        from ..media import load_video

        try:
            return load_video(sample.video, self.video_frames, exact=True)
        except VideoError as error:
            raise BadVideo(sample, sample.video, str(error)) from None

    def _media_tokens(self, sample: Sample) -> tuple[dict[str, Any], dict[str, list[list[int]]]]:
        """The pixel tensors and, per placeholder, the token ids each image / the video expands to."""
        tensors: dict[str, Any] = {"pixel_values": None, "image_sizes": None}
        tokens: dict[str, list[list[int]]] = {IMAGE_PLACEHOLDER: [], VIDEO_PLACEHOLDER: []}
        images = self.load_images(sample)
        if images:
            image_inputs = self.processor.image_processor([images], return_tensors="pt")
            tensors["pixel_values"] = image_inputs["pixel_values"]  # (images, crops, 3, H, W)
            tensors["image_sizes"] = image_inputs["image_sizes"]  # (images, 2) as (height, width)
            unit = len(self.processor.image_token)
            tokens[IMAGE_PLACEHOLDER] = [
                [self.image_token_id] * (len(self.processor.replace_image_token(image_inputs, i)) // unit)
                for i in range(len(images))
            ]
        if sample.video:
            if self.video_token_id is None or getattr(self.processor, "video_processor", None) is None:
                raise DataError(
                    f"{sample.where}: a video sample needs a model with a video token and a processor with a video "
                    "processor (pip install 'llava-manager[video]' for torchvision)"
                )
            video_inputs = self.processor.video_processor([self.load_video(sample)], return_tensors="pt")
            tensors["pixel_values_videos"] = video_inputs["pixel_values_videos"]  # (1, frames, 3, H, W)
            count = len(self.processor.replace_video_token(video_inputs, 0)) // len(self.processor.video_token)
            tokens[VIDEO_PLACEHOLDER] = [[self.video_token_id] * count]
        return tensors, tokens

    def encode(self, sample: Sample) -> dict[str, Any]:
        tensors, media_tokens = self._media_tokens(sample)
        pending = {mark: list(reversed(ids)) for mark, ids in media_tokens.items()}  # popped in text order
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in self.segments(sample):
            for piece in PLACEHOLDERS.split(text):
                if piece in pending:
                    if not pending[piece]:  # check_record makes this impossible; keep the invariant loud
                        raise DataError(f"{sample.where}: more {piece} placeholders than media")
                    ids = pending[piece].pop()
                    input_ids += ids
                    labels += [IGNORE_INDEX] * len(ids)
                elif piece:
                    ids = self._tokens(piece)
                    input_ids += ids
                    labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if any(pending.values()):
            raise DataError(f"{sample.where}: fewer placeholders than media")

        limit = self.model_max_length
        if len(input_ids) > limit:
            media_ids = {self.image_token_id, self.video_token_id}
            media_positions = [i for i, t in enumerate(input_ids) if t in media_ids]
            if media_positions and media_positions[-1] >= limit:
                kind = "video" if input_ids[media_positions[-1]] == self.video_token_id else "image"
                raise DropSample(
                    f"{len(input_ids)} tokens > model_max_length {limit} and the cut would go through its {kind} tokens"
                )
            input_ids, labels = input_ids[:limit], labels[:limit]
        if all(label == IGNORE_INDEX for label in labels):
            raise DropSample(f"no answer token within model_max_length {limit}")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            **tensors,
            "sample_id": sample.id,
        }


class BadImage(DataError):
    def __init__(self, sample: Sample, path: str, why: str):
        super().__init__(
            f"{sample.where}: cannot read image {path} ({why}); set on_bad_image: skip to drop such samples"
        )
        self.reason = f"image {path} is unreadable ({why})"


class BadVideo(DataError):
    def __init__(self, sample: Sample, path: str, why: str):
        super().__init__(f"{sample.where}: {why}; set on_bad_video: skip to drop such samples")
        self.reason = f"video {path} is unreadable ({why})"


class SupervisedDataset(torch.utils.data.Dataset):
    """Encodes samples lazily. A sample that must be dropped (too long, or a bad image / video with
    `on_bad_image` / `on_bad_video` = "skip") is replaced by the next good one; the replaced ids travel with the
    item (`dropped`) so the trainer counts them, even from dataloader workers."""

    def __init__(
        self,
        samples: list[Sample],
        encoder: ConversationEncoder,
        on_bad_image: str = "error",
        on_bad_video: str = "error",
    ):
        self.samples = samples
        self.encoder = encoder
        self.on_bad_image = on_bad_image
        self.on_bad_video = on_bad_video
        self._bad: dict[int, str] = {}  # index -> reason (per process)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        return [s.modality_length for s in self.samples]

    @property
    def has_videos(self) -> bool:
        return any(s.video for s in self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        dropped: list[str] = []
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            sample = self.samples[current]
            if current in self._bad:
                dropped.append(f"{sample.id}: {self._bad[current]}")
                continue
            try:
                item = self.encoder.encode(sample)
            except DropSample as drop:
                self._bad[current] = drop.reason
            except (BadImage, BadVideo) as bad:
                if (self.on_bad_image if isinstance(bad, BadImage) else self.on_bad_video) == "error":
                    raise
                self._bad[current] = bad.reason
            else:
                item["dropped"] = dropped
                return item
            dropped.append(f"{sample.id}: {self._bad[current]}")
        raise DataError(f"every one of the {len(self.samples)} samples had to be dropped, e.g. {dropped[:3]}")

    def drop_report(self) -> Counter:
        return Counter(self._bad.values())
