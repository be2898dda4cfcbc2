"""Tiny Manager checkpoints vLLM's CPU backend can run, and transformers' answers on them (the reference).

vLLM's CPU attention supports head sizes 32..512: the LLM is 128 wide with 4 heads (head_dim 32); SigLIP too.
The Managers get random non-zero weights (zero-initialised Managers would make every comparison pass trivially).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from llava_manager import ImageLayout, ManagerConfig, patch_llava
from llava_manager.checkpoint.assembly import build_processor
from llava_manager.testing.tiny import tiny_config, tiny_processor, tiny_tokenizer

SHAPES = {"vision_hidden": 128, "text_hidden": 128, "image_size": 32, "patch_size": 8, "text_layers": 4}


def randomise_managers(model, seed: int = 1, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.manager.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def write_checkpoint(
    folder: Path,
    manager: ManagerConfig | None = None,
    *,
    zero: bool = False,
    seed: int = 0,
    layout: ImageLayout | None = None,
    aspect_ratio: str = "anyres_max_9",
) -> Path:
    """A tiny LLaVA-OV(-Manager) checkpoint with its processor in `folder`: Managers at LLM layers 0 and 2 by
    default, random (or zero with `zero=True`). With a `layout` or another `aspect_ratio`, the processor is
    llava-manager's layout-aware one (`build_processor`), else transformers' own."""
    torch.manual_seed(seed)
    config = tiny_config(**SHAPES, vision_aspect_ratio=aspect_ratio)
    # untied, with a wider LM head than the default init: tokens that vary with the input and clear greedy margins
    # (tied 0.02-scale embeddings make every step pick the same token)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)
    model = patch_llava(model, manager or ManagerConfig(llm_layers=[0, 2]), layout=layout)
    if not zero:
        randomise_managers(model)
    model.save_pretrained(folder)
    if layout is None and aspect_ratio == "anyres_max_9":
        processor = tiny_processor(model.config)
    else:
        processor = build_processor(model.config, tiny_tokenizer())
    processor.save_pretrained(folder)
    return Path(folder)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_video(frames: int = 4, side: int = 32, seed: int = 3):
    """(frames, side, side, 3) uint8 frames, as vLLM and transformers' video processor take them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, side, side, 3), generator=generator, dtype=torch.uint8).numpy()


def prompt(processor, text: str, images: int = 1, videos: int = 0) -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def as_stock_llava_onevision(folder: Path, target: Path) -> Path:
    """A copy of a checkpoint that vLLM loads as its own LLaVA-OV: plain config, no Manager weights, SigLIP keys as
    vLLM names them (`vision_tower.vision_model.*`)."""
    from safetensors.torch import load_file, save_file

    def stock_name(key: str) -> str | None:
        if "manager" in key.split("."):
            return None
        for part in ("embeddings", "encoder", "post_layernorm"):
            key = key.replace(f"vision_tower.{part}.", f"vision_tower.vision_model.{part}.")
        return key

    target.mkdir()
    for path in folder.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llava_onevision", architectures=["LlavaOnevisionForConditionalGeneration"])
    config.pop("manager"), config.pop("image_layout")
    (target / "config.json").write_text(json.dumps(config))
    for shard in folder.glob("*.safetensors"):
        weights = {stock_name(key): value for key, value in load_file(shard).items()}
        weights.pop(None, None)
        save_file(weights, target / shard.name, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            stock_name(key): file for key, file in data["weight_map"].items() if stock_name(key) is not None
        }
        (target / index.name).write_text(json.dumps(data))
    return target
