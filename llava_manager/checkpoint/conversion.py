"""Convert an original-format checkpoint into an HF-format folder (model + processor + marker), atomically and
with a progress bar."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import ConversionError, ManagerError
from ..extras import require_extra
from .files import MARKER
from .folders import atomic_directory
from .formats import detect_format
from .source import ResolvedSource
from .weights import check_weights, read_weights


class _Progress:
    """A byte-weighted progress bar over the conversion steps (tqdm on stderr; off when not a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool | None):
        from tqdm.auto import tqdm

        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.enabled = enabled
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not enabled, desc="converting")

    def step(self, description: str, nbytes: int = 0) -> None:
        self.bar.set_description_str(description)
        if nbytes:
            self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _transformers_bars(enabled: bool):
    """transformers' own bars ("Loading weights", "Writing model shards") follow ours: off when ours is off."""
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def convert_checkpoint(
    source: ResolvedSource | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert an original-format checkpoint folder into an HF-format folder (model + processor).

    `out_dir` appears only when everything was written (temporary folder + rename); on any error nothing is left.

    Args:
        source (`ResolvedSource` or path): the original checkpoint folder (see `resolve`).
        out_dir (path): where the HF-format folder goes; must not exist unless `overwrite`.
        tokenizer (`PreTrainedTokenizerBase` or path, *optional*): defaults to the tokenizer files beside the weights.
        allow_pickle (`bool`, *optional*, defaults to `False`): accept `*.bin` weights (read with `weights_only=True`).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out_dir` (atomically).
        progress (`bool`, *optional*): show a progress bar (default: when stderr is a terminal).

    Returns:
        `Path`: `out_dir`.
    """
    require_extra(
        "vision", "converting a checkpoint (it writes transformers' LLaVA-OV processor, video part included)"
    )
    source = source if isinstance(source, ResolvedSource) else ResolvedSource(path=Path(source).resolve())
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ManagerError(f"{out_dir} already exists and is not empty; choose a new folder or pass overwrite=True")
    checkpoint = detect_format(source.path)
    if checkpoint.kind != "original":
        raise ConversionError(f"{source.description} is already in {checkpoint.description}: nothing to convert")
    safetensors, pickles = check_weights(source.path, allow_pickle=allow_pickle)
    weight_bytes = sum(p.stat().st_size for p in safetensors + pickles)
    bar = _Progress(2 * weight_bytes + 1, progress)
    try:
        with _transformers_bars(bar.enabled), atomic_directory(out_dir, replace=overwrite) as temporary:
            _convert_into(
                source, checkpoint, pickles, temporary, tokenizer=tokenizer, bar=bar, weight_bytes=weight_bytes
            )
    finally:
        bar.close()
    return out_dir


def _convert_into(source, checkpoint, pickles, out: Path, *, tokenizer, bar: _Progress, weight_bytes: int) -> None:
    import transformers

    from ..version import __version__
    from .assembly import build_processor, crop_mode_for, prepare_tokenizer
    from .original import load_original

    crop_mode = crop_mode_for(checkpoint.config)
    bar.step("reading the tokenizer")
    tokenizer = prepare_tokenizer(tokenizer if tokenizer is not None else source.path, checkpoint.config)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<video>", "<|im_start|>")}
    bar.step(f"reading and converting {format_size(weight_bytes)} of weights")
    state_dict = read_weights([], pickles) if pickles else None
    model = load_original(
        source.path,
        image_token_id=ids["<image>"],
        video_token_id=ids["<video>"],
        im_start_token_id=ids["<|im_start|>"] if ids["<|im_start|>"] != tokenizer.unk_token_id else None,
        dtype="auto",
        state_dict=state_dict,
    )
    del state_dict
    bar.step("writing the model", weight_bytes)
    processor = build_processor(model.config, tokenizer, crop_mode=crop_mode)
    _set_generation_config(model, source.path, tokenizer)
    model.save_pretrained(out)
    bar.step("writing the processor", weight_bytes)
    processor.save_pretrained(out)
    marker = {
        "source": source.repo_id or str(source.path),
        "subfolder": source.subfolder,
        "commit": source.commit,
        "format": checkpoint.description,
        "llava_manager_version": __version__,
        "transformers_version": transformers.__version__,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    bar.step("done", 1)


def _set_generation_config(model, checkpoint_dir: Path, tokenizer) -> None:
    """The checkpoint's generation_config.json (stop at <|im_end|>), with the tokenizer's pad token."""
    from transformers import GenerationConfig

    if (checkpoint_dir / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(checkpoint_dir)
        except Exception as error:
            raise ConversionError(f"{checkpoint_dir / 'generation_config.json'} cannot be read: {error}") from None
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()]
    if model.generation_config.eos_token_id is None and eos:
        model.generation_config.eos_token_id = eos[0]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def format_size(nbytes: int) -> str:
    """A byte count for people: `383.2 MB` (decimal units, as file managers and the Hub show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"
