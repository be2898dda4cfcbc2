"""Ask a LLaVA-OV(-Manager) model about images: load images, build the prompt, generate (or stream) the answer.

Used by `llava-manager chat` and by the demo's held-out scoring.

    from llava_manager.chat import ask, load_images
    answer = ask(model, processor, load_images(["cat.png"]), "What is in the image?")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .chat_format import user_prompt
from .errors import ImageError, ManagerError  # noqa: F401  (ImageError: re-exported)


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


def build_prompt(processor, num_images: int, question: str) -> str:
    """The generation prompt for one user turn with `num_images` images (images first, as LLaVA-OV trains).

    Uses the processor's chat template; without one, Qwen ChatML with the default system message."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return user_prompt(question, num_images)


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
) -> str:
    """Answer `question` about `images` (PIL images). With `stream=True` the answer is printed as it is generated.

    Args:
        model: a LLaVA-OV model (patched or not), in eval mode.
        processor: its processor.
        images (`list[PIL.Image.Image]`): may be empty (a text-only question).
        question (`str`): the user's question.
        max_new_tokens (`int`, *optional*, defaults to 128): answer length limit.
        temperature (`float`, *optional*, defaults to 0.0): 0 = greedy; above 0 = sampling at that temperature.
        stream (`bool`, *optional*, defaults to `False`): print tokens to stdout as they come.

    Returns:
        `str`: the answer, without the prompt and special tokens.
    """
    prompt = build_prompt(processor, len(images), question)
    # floating tensors (pixel_values) follow the model's dtype, e.g. bf16 checkpoints
    inputs = processor(images=images or None, text=prompt, return_tensors="pt").to(model.device, dtype=model.dtype)
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
    """Greedy answers to many `(images, question)` items, `batch_size` at a time (left padding)."""
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
            with torch.inference_mode():
                output = model.generate(**inputs, **_generation_kwargs(model, processor, max_new_tokens, 0.0))
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers
