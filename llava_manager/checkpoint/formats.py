"""Which format a checkpoint folder is in: our HF format (loads directly) or the original LLaVA-NeXT one (converted)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from .files import folders_with_config

HF_MODEL_TYPES = ("llava_onevision_manager", "llava_onevision")


def is_original_format(config: dict) -> bool:
    """LLaVA-NeXT-format configs: `architectures` like `LlavaQwen*` and `mm_*` fields (model_type says "qwen2")."""
    architectures = config.get("architectures") or []
    return "mm_vision_tower" in config and (
        any(a.startswith("Llava") and "ForCausalLM" in a for a in architectures) or "mm_projector_type" in config
    )


def has_managers(config: dict) -> bool:
    """An original config with Managers (`mm_manager_type` set; the `Baseline*` checkpoints have none)."""
    return config.get("mm_manager_type") is not None


@dataclass(frozen=True)
class CheckpointFormat:
    kind: str  # "hf" (loads directly) or "original" (needs conversion)
    managers: bool
    config: dict

    @property
    def description(self) -> str:
        if self.kind == "hf":
            return f"HF format ({self.config.get('model_type')}{', with Managers' if self.managers else ''})"
        return "original LLaVA-OV format" + (" with Managers" if self.managers else " without Managers (Baseline)")


def read_config(path: Path) -> dict:
    """The folder's config.json as a dict; `ConversionError` naming what is wrong otherwise."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        inside = folders_with_config(Path(path)) if Path(path).is_dir() else []
        hint = f"; checkpoints are in its subfolders {inside}: pass subfolder=" if inside else ""
        raise ConversionError(f"{path} has no config.json, so it is not a checkpoint folder{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}); the download may be corrupt") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file} does not hold a JSON object")
    return config


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """Which format a checkpoint folder is in. Raises `ConversionError` for anything else."""
    config = read_config(Path(path))
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return CheckpointFormat("hf", managers=config.get("manager") is not None, config=config)
    if is_original_format(config):
        return CheckpointFormat("original", managers=has_managers(config), config=config)
    raise ConversionError(
        f"{path} is neither an original LLaVA-OV(-Manager) checkpoint (architectures LlavaQwenManagerForCausalLM "
        "or LlavaQwenForCausalLM, with mm_* fields) nor a converted one (model_type 'llava_onevision_manager' or "
        f"'llava_onevision'); its config.json says model_type={model_type!r}, "
        f"architectures={config.get('architectures')!r}"
    )
