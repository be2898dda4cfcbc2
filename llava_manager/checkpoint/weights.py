"""Find a checkpoint folder's weight files, check them (headers only), and read them: the one place that knows
sharded indexes, truncated files and the pickle refusal."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConversionError


def check_weights(
    path: Path, *, allow_pickle: bool = False, pickle_names: list[str] | None = None
) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files to use). Reads only headers: missing, truncated and corrupt files raise.

    Args:
        path (`Path`): the checkpoint folder.
        allow_pickle (`bool`): accept pickle-only (`*.bin`) weights; refused by default (pickle can run code).
        pickle_names (`list[str]`, *optional*): pickle files known to be in the (remote) folder though not on disk.
    """
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a valid safetensors index ({error!r})") from None
        safetensors = [path / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in safetensors if not p.is_file()]
        if missing:
            raise ConversionError(f"{index} lists shards that are missing from {path}: {missing[:3]}; download again")
    else:
        safetensors = sorted(path.glob("*.safetensors"))
    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError): all mean unreadable
            raise ConversionError(
                f"{file} is not a readable safetensors file, probably truncated or corrupt ({error}); delete it and "
                "download it again"
            ) from None
    if safetensors:
        return safetensors, []
    pickles = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    names = pickle_names or [p.name for p in pickles]
    if names and not allow_pickle:
        raise ConversionError(
            f"{path} has only pickle weights ({', '.join(names[:3])}). Pickle files can run code "
            "when loaded, so they are refused. Convert them to safetensors, or opt in with allow_pickle=True "
            "(`--allow-pickle`): they are then read with torch.load(weights_only=True)."
        )
    if not pickles:
        raise ConversionError(
            f"{path} has no weights (model.safetensors, sharded *.safetensors, or pytorch_model.bin)"
        )
    return [], pickles


def read_weights(safetensors: list[Path], pickles: list[Path] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the files `check_weights` returned, as one state dict (pickles: `weights_only=True`)."""
    from safetensors.torch import load_file

    state = {}
    for file in safetensors:
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # as in check_weights: any failure here means an unreadable file
            raise ConversionError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from None
    for file in pickles:
        try:
            loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # weights_only refusals (UnpicklingError) and broken files alike
            raise ConversionError(f"{file} could not be read with torch.load(weights_only=True): {error}") from None
        if not isinstance(loaded, dict):
            raise ConversionError(f"{file} does not hold a state dict (got {type(loaded).__name__})")
        state.update(loaded)
    return state
