"""Which checkpoint a resumed run starts from: the newest complete `checkpoint-N`, never a half-written one.

A kill during a save can leave the newest `checkpoint-N` without `trainer_state.json` or with a truncated weight or
optimizer file; the Trainer would then fail with a bare `FileNotFoundError` / `PytorchStreamReader` error although
the checkpoint before it resumes exactly. The checks here read only file headers (zip directories, safetensors
headers), not the tensors.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from .recipe import RecipeError

logger = logging.getLogger("llava_manager.train")

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_TORCH_FILES = ("*.pt", "*.pth", "*.bin", "global_step*/*.pt")  # torch.save writes zip archives


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was cut off)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json is unreadable ({error})"
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not weights and not list(folder.glob("global_step*")):
        return "no model weights"
    for path in weights:
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                return f"{path.name} {problem}"
    for pattern in _TORCH_FILES:
        for path in folder.glob(pattern):
            try:
                with zipfile.ZipFile(path):
                    pass
            except (OSError, zipfile.BadZipFile) as error:
                return f"{path.relative_to(folder)} is truncated or corrupt ({error})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError): all mean unreadable
        return f"is truncated or corrupt ({error})"
    return None


def _checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (largest N) first."""
    found = [
        (int(match.group(1)), path)
        for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def choose_checkpoint(output_dir: str | Path, resume: bool | str | None) -> str | None:
    """The checkpoint folder to resume from (for `Trainer.train(resume_from_checkpoint=...)`), or None.

    `resume=True`: the newest complete checkpoint in `output_dir`; skipped ones are logged with the reason.
    A path: that checkpoint, if complete. Raises `RecipeError` naming the problem and the newest complete one.
    """
    if resume in (None, False):
        return None
    output_dir = Path(output_dir)
    if resume is True:
        skipped = []
        for folder in _checkpoints(output_dir):
            problem = checkpoint_problem(folder)
            if problem is None:
                for name, reason in skipped:
                    logger.warning("resume: skipping %s: %s", name, reason)
                logger.warning("resume: continuing from %s", folder)
                return str(folder)
            skipped.append((folder.name, problem))
        if skipped:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
            raise RecipeError(
                f"recipe key 'resume_from_checkpoint': no complete checkpoint in {output_dir} ({reasons})"
            )
        raise RecipeError(
            f"recipe key 'resume_from_checkpoint' = true but {output_dir} has no checkpoint-N folder; set save_steps "
            "to save checkpoints, or drop the key to start afresh"
        )
    folder = Path(resume)
    if not folder.is_dir():
        raise RecipeError(f"recipe key 'resume_from_checkpoint' = {resume!r}: no such folder")
    problem = checkpoint_problem(folder)
    if problem is not None:
        complete = [f for f in _checkpoints(folder.parent) if checkpoint_problem(f) is None]
        hint = f"; the newest complete one there is {complete[0]}" if complete else ""
        raise RecipeError(f"recipe key 'resume_from_checkpoint' = {resume!r}: cannot resume from it: {problem}{hint}")
    return str(folder)
