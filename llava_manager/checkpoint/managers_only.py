"""Managers-only weights, PEFT-style: a trained Manager set without the 900 MB+ model it sits in.

    save_managers(model, "my-managers")                  # manager_config.json + managers.safetensors (< 1 MB at 0.5B)
    model = load_managers(base_model, "my-managers")     # or a Hub repo id; patches `base_model` and loads them

The folder holds:

- `manager_config.json`: the resolved `ManagerConfig`, the `ImageLayout`, which parts the weights hold, and the base
  model's shapes (vision and LLM widths and layer counts) with its name, so a mismatched base is refused by name;
- `managers.safetensors`: the Manager parameters, keyed as in the `LlavaOnevisionModel` (`manager.*`), plus the
  projector (`multi_modal_projector.*`) and `image_newline` when asked (`include=("projector", "image_newline")`:
  what a run that also trained them needs to be reproduced).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import HubError, ManagerError
from .folders import atomic_directory

CONFIG_NAME = "manager_config.json"
WEIGHTS_NAME = "managers.safetensors"
FORMAT = "llava-manager/managers"
FORMAT_VERSION = 1
PARTS = {"projector": "multi_modal_projector.", "image_newline": "image_newline"}
#: what a base model must share with the one the Managers were trained on (name in the file -> config path)
BASE_SHAPES = {
    "vision_hidden_size": ("vision_config", "hidden_size"),
    "vision_num_hidden_layers": ("vision_config", "num_hidden_layers"),
    "text_hidden_size": ("text_config", "hidden_size"),
    "text_num_hidden_layers": ("text_config", "num_hidden_layers"),
}


def is_managers_folder(folder: str | os.PathLike) -> bool:
    """True for a folder written by `save_managers` (it has `manager_config.json`, not a model's `config.json`)."""
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def base_shapes(model_config) -> dict[str, int]:
    return {name: getattr(getattr(model_config, part), key) for name, (part, key) in BASE_SHAPES.items()}


# ---- save --------------------------------------------------------------------------------------------------
def _saved_state(llava, include: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{key in the LlavaOnevisionModel: full tensor} for the Managers and the `include`d parts (gathered first when
    DeepSpeed ZeRO-3 partitioned them)."""
    named = {f"manager.{name}": p for name, p in llava.manager.named_parameters()}
    named.update({f"manager.{name}": b for name, b in llava.manager.named_buffers() if name not in named})
    for part in include:
        prefix = PARTS[part]
        named.update({n: p for n, p in llava.named_parameters() if n == prefix or n.startswith(prefix)})
    partitioned = [t for t in named.values() if getattr(t, "ds_numel", None) is not None and t.numel() != t.ds_numel]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in named.items()}
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in named.items()}


def save_managers(
    model,
    save_directory: str | os.PathLike,
    *,
    include: Iterable[str] = (),
    overwrite: bool = False,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload Managers (llava-manager)",
    trained_parts: Iterable[str] = (),
) -> Path:
    """Write the Managers of a patched model (and, if asked, its projector / newline) to `save_directory`.

    Args:
        model: a patched LLaVA-OV (`patch_llava`, `from_pretrained` of a Manager checkpoint; DeepSpeed / PEFT
            wrappers are unwrapped; ZeRO-3 partitions are gathered).
        save_directory (`str` or `os.PathLike`): the folder to write; it appears whole or not at all.
        include (`Iterable[str]`, *optional*): also save `"projector"` and / or `"image_newline"` (trained in
            stage 1.5 and later: without them the Managers sit on the base's own projector).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing folder (refused otherwise).
        push_to_hub (`bool`, *optional*, defaults to `False`): then upload the folder to `repo_id` (created if
            needed; `private`, `token` and `commit_message` go to `huggingface_hub`).
        trained_parts (`Iterable[str]`, *optional*): the parts the run trained besides the Managers
            (`"vision_tower"`, `"language_model"`, ...): recorded, so that `load_managers` can warn that a base
            without that training gives other outputs.

    Returns:
        `Path`: the folder written.
    """
    from ..attach import is_patched, llava_model_of, unwrap

    include = tuple(dict.fromkeys(include))
    unknown = [part for part in include if part not in PARTS]
    if unknown:
        raise ManagerError(f"save_managers: include={unknown} unknown; choose from {sorted(PARTS)}")
    if push_to_hub and not repo_id:
        raise ManagerError("save_managers(push_to_hub=True) needs repo_id='user/name'")
    model = unwrap(model)
    llava = llava_model_of(model)
    if llava is None or not is_patched(model) or model.config.manager is None:
        raise ManagerError(
            f"save_managers needs a LLaVA-OV model patched with Managers (patch_llava), got {type(model).__name__}"
            + (" without Managers" if llava is not None and is_patched(model) else "")
        )
    folder = Path(save_directory)
    state = _saved_state(llava, include)
    base_name = getattr(model.config, "_name_or_path", "") or ""
    config = _config_dict(model.config, include, base_name, trained_parts, next(iter(state.values())).dtype)
    _write(folder, state, config, overwrite)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return folder


def _config_dict(model_config, include, base_name: str, trained_parts, dtype) -> dict:
    from ..version import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llava_manager_version": __version__,
        "manager": dict(model_config.manager),
        "image_layout": dict(getattr(model_config, "image_layout", None) or {}),
        "includes": ["managers", *include],
        "base_model": {"name_or_path": base_name, **base_shapes(model_config)},
        "trained_parts": sorted(set(trained_parts)),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _write(folder: Path, state: dict, config: dict, overwrite: bool) -> None:
    from safetensors.torch import save_file

    if folder.exists() and not overwrite:
        raise ManagerError(f"{folder} exists; pass overwrite=True to replace it, or choose another folder")
    with atomic_directory(folder, replace=overwrite) as temporary:
        save_file(state, str(temporary / WEIGHTS_NAME), metadata={"format": "pt"})
        (temporary / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _in_llava_model(key: str, include: tuple[str, ...]) -> str | None:
    """A saved checkpoint key (`model.manager.*`, `multi_modal_projector.*`, ...) -> its key in the
    LlavaOnevisionModel, for the Managers and the `include`d parts; else None."""
    parts = key.split(".")
    if "manager" in parts:
        return ".".join(parts[parts.index("manager") :])
    for part in include:
        name = PARTS[part].rstrip(".")
        if name in parts:
            return ".".join(parts[parts.index(name) :])
    return None


def save_managers_from_checkpoint(
    checkpoint_dir: str | os.PathLike,
    save_directory: str | os.PathLike,
    *,
    include: Iterable[str] = (),
    base_name: str = "",
    trained_parts: Iterable[str] = (),
    overwrite: bool = False,
) -> Path:
    """`save_managers` for a saved HF-format Manager checkpoint, reading only the tensors it needs (what `train`
    writes beside the full model: no second copy of the model in memory, and no collective under ZeRO-3)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from .. import modeling as _registers_the_model_type  # noqa: F401

    checkpoint_dir = Path(checkpoint_dir)
    include = tuple(dict.fromkeys(include))
    model_config = AutoConfig.from_pretrained(checkpoint_dir)
    if getattr(model_config, "manager", None) is None:
        raise ManagerError(f"{checkpoint_dir} has no Managers (config.json 'manager' is null); nothing to save")
    index = checkpoint_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state = {}
    for name in files:
        with safe_open(str(checkpoint_dir / name), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118
                target = _in_llava_model(key, include)
                if target is not None:
                    state[target] = weights.get_tensor(key)
    if not any(key.startswith("manager.") for key in state):
        raise ManagerError(f"{checkpoint_dir}: no Manager tensors in its weights")
    config = _config_dict(model_config, include, base_name, trained_parts, next(iter(state.values())).dtype)
    folder = Path(save_directory)
    _write(folder, state, config, overwrite)
    return folder


# ---- load --------------------------------------------------------------------------------------------------
def resolve_managers(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a Managers-only save: `path_or_repo` itself, or its Hub snapshot (huggingface_hub)."""
    from .source import _snapshot, looks_like_path

    name = os.fspath(path_or_repo)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file():
            raise ManagerError(
                f"{name} has no {CONFIG_NAME}: not a Managers-only folder (save_managers writes one)"
                + (
                    "; it is a full checkpoint: load it with llava_manager.from_pretrained"
                    if (local / "config.json").is_file()
                    else ""
                )
            )
        return local
    if local.exists() or looks_like_path(name):
        raise ManagerError(f"{name!r} is not a folder; pass a folder written by save_managers or a Hub repo id")
    snapshot = Path(
        _snapshot(
            name,
            revision,
            [CONFIG_NAME, WEIGHTS_NAME],
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    )
    if not (snapshot / CONFIG_NAME).is_file():
        raise HubError(f"Hub repo {name!r} has no {CONFIG_NAME} at its root: not a Managers-only repo")
    return snapshot


def read_manager_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ManagerError(f"{folder / CONFIG_NAME} cannot be read: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ManagerError(f"{folder / CONFIG_NAME} is not a llava-manager Managers file (format {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ManagerError(
            f"{folder} was written by a newer llava-manager ({config.get('llava_manager_version')}, format "
            f"{config['format_version']}); upgrade: pip install -U llava-manager"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise ManagerError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the save is incomplete")
    return config


def check_base(model_config, saved: dict, where: str) -> None:
    """Refuse a base whose widths / layer counts differ from the one the Managers were trained on."""
    expected = saved.get("base_model", {})
    actual = base_shapes(model_config)
    wrong = [
        f"{name} {actual[name]} (trained on {expected[name]})"
        for name in BASE_SHAPES
        if name in expected and expected[name] != actual[name]
    ]
    if wrong:
        trained_on = expected.get("name_or_path") or "another model"
        raise ManagerError(
            f"the Managers in {where} do not fit this base model: {', '.join(wrong)}. They were trained on "
            f"{trained_on}; load that base model (or one with the same shapes)."
        )


def load_managers(
    base_model,
    managers: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
):
    """Patch a plain LLaVA-OV `base_model` with the Managers saved by `save_managers` and load their weights.

    Args:
        base_model: a transformers LLaVA-OV model, not patched yet (the base the Managers were trained on).
        managers (`str` or `os.PathLike`): a folder written by `save_managers`, or a Hub repo id holding one.
        revision, cache_dir, token, local_files_only: for a Hub repo id (`huggingface_hub`).

    Returns:
        `base_model`, patched (its class becomes the Manager class) and in the mode it was in.

    Raises:
        `ManagerError`: not a Managers folder, a base with other widths or layer counts, weights that do not match
            the saved config; the model is left as it was. `HubError`: the repo cannot be found or is not cached.
    """
    from safetensors import safe_open

    from ..attach import llava_model_of, unwrap
    from ..config import ImageLayout, ManagerConfig
    from ..patch import _check_model, patch_llava, unpatch_llava

    folder = resolve_managers(
        managers, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    saved = read_manager_config(folder)
    model = unwrap(base_model)
    if _layout_of_unmanaged(model) is None:
        _check_model(model)  # a LLaVA-OV without Managers
    if any(getattr(p, "ds_numel", None) is not None for p in model.parameters()):
        raise ManagerError(
            "load_managers needs the base model unpartitioned (it is under DeepSpeed ZeRO-3): load the Managers "
            "before deepspeed.initialize / Trainer, or save a full checkpoint and load that."
        )
    check_base(model.config, saved, str(folder))
    others = [part for part in saved.get("trained_parts", []) if part not in ("manager", "projector")]
    if others:
        warnings.warn(
            f"the run that trained the Managers in {folder} also trained {', '.join(others)}: on a base without "
            "that training they give other outputs than the run's full model (load that model instead).",
            stacklevel=2,
        )
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as weights:
            state = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118  (safe_open has no iter)
    except Exception as error:  # safetensors raises its own SafetensorError / OSError
        raise ManagerError(f"{folder / WEIGHTS_NAME} cannot be read ({error}); save the Managers again") from None

    layout_only = _layout_of_unmanaged(model)  # a `Baseline*` checkpoint loads patched with a layout, no Managers
    if layout_only is not None:
        unpatch_llava(model)
    try:
        patch_llava(
            model,
            ManagerConfig.from_dict(saved["manager"]),
            layout=ImageLayout.from_dict(saved.get("image_layout")),
        )
        try:
            _copy_into(llava_model_of(model), state, str(folder))
        except BaseException:
            unpatch_llava(model)
            raise
    except BaseException:
        if layout_only is not None:
            patch_llava(model, layout=layout_only, managers=False)
        raise
    return base_model


def _layout_of_unmanaged(model):
    """The image layout of a model patched without Managers (a released `Baseline*` checkpoint), else None."""
    from ..attach import is_patched
    from ..config import ImageLayout

    if is_patched(model) and getattr(model.config, "manager", None) is None:
        return ImageLayout.from_dict(getattr(model.config, "image_layout", None))
    return None


def _copy_into(llava, state: dict[str, torch.Tensor], where: str) -> None:
    """Check every saved tensor against the patched model (all Manager tensors present, nothing unknown, same
    shapes), then copy them in (cast to the model's dtype)."""
    targets = {f"manager.{n}": t for n, t in llava.manager.state_dict(keep_vars=True).items()}
    missing = sorted(k for k in targets if k not in state)
    for key in state:
        if key not in targets and any(key == p or key.startswith(p) for p in PARTS.values()):
            targets[key] = llava.get_parameter(key)
    unknown = sorted(k for k in state if k not in targets)
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(targets[k].shape)}"
        for k in state
        if k in targets and state[k].shape != targets[k].shape
    ]
    if missing or unknown or wrong:
        problems = []
        if missing:
            problems.append(f"missing {missing[:3]}")
        if unknown:
            problems.append(f"unknown keys {unknown[:3]}")
        if wrong:
            problems.append(f"other shapes: {wrong[:3]}")
        raise ManagerError(
            f"{where}/{WEIGHTS_NAME} does not match its {CONFIG_NAME} on this base ({'; '.join(problems)}); "
            "the folder was edited or written by another tool"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            targets[key].copy_(tensor)
