"""Ask a LLaVA-OV(-Manager) model about images: load images, build the prompt, generate (or stream) the answer.

Used by `llava-manager chat` and by the demo's held-out scoring.

    from llava_manager.chat import ask, load_images
    answer = ask(model, processor, load_images(["cat.png"]), "What is in the image?")
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .chat_format import user_prompt
from .errors import ImageError, ManagerError, RequestError, VideoError  # noqa: F401  (ImageError: re-exported)

logger = logging.getLogger("llava_manager.chat")


def load_images(paths: list[str | os.PathLike]) -> list:
    """Open every image as RGB; raises `ImageError` naming the first missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ImageError(f"image {str(path)!r} does not exist; check the path")
        if not path.is_file():
            raise ImageError(f"image {str(path)!r} is not a file")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except UnidentifiedImageError:
            raise ImageError(
                f"cannot read image {str(path)!r}: not an image format PIL knows (PNG, JPEG, ...)"
            ) from None
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageError(f"cannot read image {str(path)!r}: {error} (truncated or corrupt file?)") from None
    return images


VIDEO_FRAMES = 32  # LLaVA-OV's video evaluation (lmms-eval's llava_onevision model) samples 32 frames
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_video(path: str | os.PathLike, num_frames: int = VIDEO_FRAMES):
    """`(F, H, W, 3)` uint8 frames, `F = min(num_frames, frames available)` sampled uniformly over the video.

    `path` is a video file (decoded by transformers' `load_video` with PyAV) or a folder of frame images (sorted by
    name). Raises `VideoError` naming the path when it is missing, empty or cannot be decoded."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise VideoError(f"video {str(path)!r} does not exist; check the path")
    if num_frames < 1:
        raise VideoError(f"num_frames {num_frames}: sample at least one frame")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise VideoError(f"video folder {str(path)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        picks = sorted(set(np.linspace(0, len(files) - 1, min(num_frames, len(files))).round().astype(int)))
        try:
            return np.stack([np.asarray(image) for image in load_images([files[i] for i in picks])])
        except ImageError as error:
            raise VideoError(f"video folder {str(path)!r}: {error}") from None
        except ValueError:
            raise VideoError(f"video folder {str(path)!r}: its frames differ in size") from None
    try:
        import av  # noqa: F401  (transformers' default video decoder)
    except ImportError:
        raise VideoError(
            f"decoding {str(path)!r} needs PyAV: pip install 'llava-manager[video]' (or pip install av), or pass a "
            "folder of frame images"
        ) from None
    from transformers.video_utils import load_video as transformers_load_video

    def uniform(metadata, **_kwargs):
        total = int(metadata.total_num_frames)
        return np.unique(np.linspace(0, total - 1, min(num_frames, total)).round().astype(int))

    try:
        frames, _metadata = transformers_load_video(str(path), sample_indices_fn=uniform)
    except Exception as error:  # PyAV raises its own error types for every kind of broken file
        raise VideoError(f"cannot decode video {str(path)!r}: {error}") from None
    if len(frames) == 0:
        raise VideoError(f"video {str(path)!r} has no frames")
    return np.asarray(frames)


def build_prompt(processor, num_images: int, question: str, num_videos: int = 0) -> str:
    """The generation prompt for one user turn with `num_images` images and `num_videos` videos (media first, as
    LLaVA-OV trains; videos after images, as its chat template orders them).

    Uses the processor's chat template; without one, Qwen ChatML with the default system message."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
    content.append({"type": "text", "text": question})
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return user_prompt(question, num_images, num_videos=num_videos)


def check_request(question: str, *, temperature: float = 0.0, max_new_tokens: int = 1) -> None:
    """Refuse what cannot be answered as asked: an empty question, a temperature that is not a finite number
    >= 0 (NaN would silently mean greedy), fewer than one new token. Raises `RequestError`."""
    if not isinstance(question, str) or not question.strip():
        raise RequestError(f"the question is empty ({question!r}): ask something")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise RequestError(f"temperature {temperature!r}: use 0 (greedy) or a positive finite number")
    if temperature < 0:
        raise RequestError(f"temperature {temperature}: use 0 (greedy) or a positive number")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RequestError(f"max_new_tokens {max_new_tokens!r}: use a whole number >= 1")


def context_limit(model) -> int | None:
    """The most positions the model's language model was built for (`max_position_embeddings`), if it says."""
    config = getattr(model.config, "text_config", model.config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_answer_length(prompt_tokens: int, max_new_tokens: int, limit: int | None, what: str = "the prompt") -> int:
    """`max_new_tokens`, shortened (with a warning) so prompt and answer fit in `limit` positions.

    Raises `RequestError` when the prompt alone (images included) leaves no room for one new token: transformers
    would otherwise return an empty answer without a word."""
    if limit is None:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise RequestError(
            f"{what} is {prompt_tokens} tokens (images included), the model's context is {limit} "
            "(text_config.max_position_embeddings): shorten the question, or use fewer or smaller images"
        )
    room = limit - prompt_tokens
    if max_new_tokens > room:
        logger.warning(
            "%s is %d tokens of the model's %d: the answer is cut at %d new tokens instead of %d",
            what,
            prompt_tokens,
            limit,
            room,
            max_new_tokens,
        )
        return room
    return max_new_tokens


def _generation_kwargs(model, processor, max_new_tokens: int, temperature: float) -> dict:
    tokenizer = processor.tokenizer
    # never generate an image / video placeholder: the next step would be an image token without an image
    placeholders = {getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")} - {None}
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "suppress_tokens": sorted(placeholders),
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def ask(
    model,
    processor,
    images: list,
    question: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    stream: bool = False,
    videos: list | None = None,
) -> str:
    """Answer `question` about `images` (PIL images) and `videos` (frame arrays, see `load_video`). With
    `stream=True` the answer is printed as it is generated.

    Args:
        model: a LLaVA-OV model (patched or not), in eval mode.
        processor: its processor.
        images (`list[PIL.Image.Image]`): may be empty (a text-only question).
        question (`str`): the user's question.
        max_new_tokens (`int`, *optional*, defaults to 128): answer length limit.
        temperature (`float`, *optional*, defaults to 0.0): 0 = greedy; above 0 = sampling at that temperature.
        stream (`bool`, *optional*, defaults to `False`): print tokens to stdout as they come.
        videos (`list[numpy.ndarray]`, *optional*): `(F, H, W, 3)` frames per video.

    Returns:
        `str`: the answer, without the prompt and special tokens.

    Raises:
        `RequestError`: an empty question, a temperature that is not a finite number >= 0, `max_new_tokens` < 1, or
            a prompt (images included) as long as the model's context. An answer that would run past the context is
            cut to fit, with a warning.
    """
    check_request(question, temperature=temperature, max_new_tokens=max_new_tokens)
    videos = list(videos or [])
    if videos and getattr(processor, "video_processor", None) is None:
        raise RequestError("this processor has no video processor (it needs torchvision): pip install torchvision")
    prompt = build_prompt(processor, len(images), question, num_videos=len(videos))
    # floating tensors (pixel_values) follow the model's dtype, e.g. bf16 checkpoints
    inputs = processor(images=images or None, videos=videos or None, text=prompt, return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    max_new_tokens = fit_answer_length(inputs["input_ids"].shape[1], max_new_tokens, context_limit(model))
    kwargs = _generation_kwargs(model, processor, max_new_tokens, temperature)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def ask_batch(
    model, processor, items: list[tuple[list, str]], *, max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy answers to many `(images, question)` items, `batch_size` at a time (left padding). Checked as `ask`
    checks (the longest prompt of a batch sets its answer length)."""
    for _, question in items:
        check_request(question, max_new_tokens=max_new_tokens)
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prompts = [build_prompt(processor, len(images), question) for images, question in chunk]
            images = [image for item_images, _ in chunk for image in item_images]
            inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
            inputs = inputs.to(model.device, dtype=model.dtype)
            what = f"the longest prompt of items {start}..{start + len(chunk) - 1}"
            length = fit_answer_length(inputs["input_ids"].shape[1], max_new_tokens, context_limit(model), what)
            with torch.inference_mode():
                output = model.generate(**inputs, **_generation_kwargs(model, processor, length, 0.0))
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers
