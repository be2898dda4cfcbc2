"""Tiny Manager checkpoints vLLM's CPU backend can run, and transformers' answers on them (the reference).

vLLM's CPU attention supports head sizes 32..512: the LLM is 128 wide with 4 heads (head_dim 32); SigLIP too.
The Managers get random non-zero weights (zero-initialised Managers would make every comparison pass trivially).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from llava_manager import ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_config, tiny_processor

SHAPES = {"vision_hidden": 128, "text_hidden": 128, "image_size": 32, "patch_size": 8, "text_layers": 4}


def randomise_managers(model, seed: int = 1, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.manager.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def write_checkpoint(folder: Path, manager: ManagerConfig | None = None, *, zero: bool = False, seed: int = 0) -> Path:
    """A tiny LLaVA-OV(-Manager) checkpoint with its processor in `folder`: Managers at LLM layers 0 and 2 by
    default, random (or zero with `zero=True`)."""
    torch.manual_seed(seed)
    config = tiny_config(**SHAPES)
    # untied, with a wider LM head than the default init: tokens that vary with the input and clear greedy margins
    # (tied 0.02-scale embeddings make every step pick the same token)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)
    if manager is not False:
        model = patch_llava(model, manager or ManagerConfig(llm_layers=[0, 2]))
        if not zero:
            randomise_managers(model)
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return Path(folder)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompt(processor, text: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
