"""Ask a LLaVA-OV(-Manager) model about images: load images, build the prompt, generate (or stream) the answer.

Used by `llava-manager chat` and by the demo's held-out scoring.

    from llava_manager.chat import ask, load_images
    answer = ask(model, processor, load_images(["cat.png"]), "What is in the image?")
"""

from __future__ import annotations

import logging
import math

import torch

from .chat_format import user_prompt
from .errors import ImageError, ManagerError, RequestError, VideoError  # noqa: F401  (ImageError: re-exported)
from .media import VIDEO_FRAMES, load_images, load_video  # noqa: F401  (re-exported: chat.load_images, ...)

logger = logging.getLogger("llava_manager.chat")


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


def ask_batch(model, processor, items: list[tuple], *, max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy answers to many `(images, question)` or `(images, question, videos)` items, `batch_size` at a time
    (left padding; the videos of one batch must share a frame count). Checked as `ask` checks (the longest prompt
    of a batch sets its answer length)."""
    items = [(item[0], item[1], item[2] if len(item) > 2 else []) for item in items]
    for _, question, _ in items:
        check_request(question, max_new_tokens=max_new_tokens)
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            prompts = [
                build_prompt(processor, len(images), question, len(videos)) for images, question, videos in chunk
            ]
            images = [image for item_images, _, _ in chunk for image in item_images]
            videos = [video for _, _, item_videos in chunk for video in item_videos]
            inputs = processor(
                images=images or None, videos=videos or None, text=prompts, return_tensors="pt", padding=True
            )
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
