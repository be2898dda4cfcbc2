"""Original LLaVA-NeXT-format checkpoints (the authors' `LlavaQwenManagerForCausalLM` / `LlavaQwenForCausalLM`)
-> patched transformers LLaVA-OV models. Pure conversion: config mapping, key mapping, shape checks.

Hub download, caching and processor assembly live in hub.py / processor.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from .config import ImageLayout, ManagerConfig, ManagerError

#: configs of vision towers named by `mm_vision_tower`, so conversion needs no download
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        num_channels=3,
    ),
}

MANAGER_TYPES = {
    "static_zerouni": "static",
    "adaptive_zerouni": "adaptive",
    "adaptive_last_zerouni": "adaptive_last",
    "adaptive_average_zerouni": "adaptive_average",
    "adaptive_cross_zerouni": "adaptive_cross",
}
GRID_TYPES = {"all": "all", "main": "base", "grid": "grid"}
QWEN2_IM_START_ID = 151644

_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


class ConversionError(ManagerError):
    """An original-format checkpoint that cannot be converted (says which file / key / field)."""


def is_original_format(config: dict) -> bool:
    """LLaVA-NeXT-format configs: `architectures` like `LlavaQwen*` and `mm_*` fields (model_type says "qwen2")."""
    architectures = config.get("architectures") or []
    return "mm_vision_tower" in config and (
        any(a.startswith("Llava") and "ForCausalLM" in a for a in architectures) or "mm_projector_type" in config
    )


def has_managers(config: dict) -> bool:
    return config.get("mm_manager_type") is not None


# ---- config mapping ---------------------------------------------------------------------------------------


def _vision_tower_config(name: str, search_dirs: list[Path]) -> dict:
    if name in KNOWN_VISION_TOWERS:
        return dict(KNOWN_VISION_TOWERS[name])
    candidates = [Path(name)] if os.path.isabs(name) else [d / name for d in search_dirs]
    for candidate in candidates:
        config_file = candidate / "config.json"
        if config_file.is_file():
            data = json.loads(config_file.read_text())
            data = data.get("vision_config", data)
            keys = (
                "hidden_size intermediate_size num_hidden_layers num_attention_heads image_size patch_size "
                "hidden_act layer_norm_eps attention_dropout num_channels"
            ).split()
            return {k: data[k] for k in keys if k in data}
    try:  # a tower the user has in the Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            data = json.loads(Path(cached).read_text())
            return _vision_tower_config(str(Path(cached).parent), []) if data else {}
    except Exception:
        pass
    raise ConversionError(
        f"mm_vision_tower={name!r}: its config is not known and was not found in {[str(d) for d in search_dirs]} "
        "or the Hugging Face cache. Put the tower's config.json in a folder of that name next to the checkpoint."
    )


def convert_config(
    original: dict,
    *,
    checkpoint_dir: Path,
    num_vision_layers: int,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    im_start_token_id: int | None = None,
) -> tuple[LlavaOnevisionConfig, ManagerConfig | None, ImageLayout]:
    """Map an original config.json to (LLaVA-OV config, ManagerConfig or None, ImageLayout)."""
    search_dirs = [checkpoint_dir, checkpoint_dir.parent, checkpoint_dir.parent.parent]
    vision_fields = _vision_tower_config(original["mm_vision_tower"], search_dirs)
    vision_fields["num_hidden_layers"] = num_vision_layers  # LLaVA-OV drops SigLIP's last layer; trust the weights
    vision = SiglipVisionConfig(**vision_fields, vision_use_head=False)

    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type={original['mm_projector_type']!r}: only 'mlp2x_gelu' is supported")
    rope_theta = original.get("rope_theta", 1e6)
    text = Qwen2Config(
        vocab_size=original["vocab_size"],
        hidden_size=original["hidden_size"],
        intermediate_size=original["intermediate_size"],
        num_hidden_layers=original["num_hidden_layers"],
        num_attention_heads=original["num_attention_heads"],
        num_key_value_heads=original.get("num_key_value_heads", original["num_attention_heads"]),
        hidden_act=original.get("hidden_act", "silu"),
        max_position_embeddings=original.get("max_position_embeddings", 32768),
        rms_norm_eps=original.get("rms_norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=original.get("tie_word_embeddings", False),
        attention_dropout=original.get("attention_dropout", 0.0),
        use_sliding_window=False,
        bos_token_id=original.get("bos_token_id"),
        eos_token_id=original.get("eos_token_id"),
    )

    aspect = original.get("image_aspect_ratio") or "square"
    merge = original.get("mm_patch_merge_type") or "flat"
    crop = vision.image_size
    if aspect.startswith("anyres"):
        if "unpad" not in merge:
            raise ConversionError(f"image_aspect_ratio={aspect!r} with mm_patch_merge_type={merge!r} is not supported")
        layout = ImageLayout(mode="anyres", unpad="truncate")
        pinpoints = [[int(h), int(w)] for w, h in _pinpoints(original.get("image_grid_pinpoints"), crop)]
        vision_aspect_ratio = aspect if aspect.startswith("anyres_max_") else "anyres"
    else:  # square / pad: one crop per image, no newline
        layout = ImageLayout(mode="square", unpad="truncate")
        pinpoints = [[crop, crop]]
        vision_aspect_ratio = "anyres"

    vocab = original["vocab_size"]
    image_token_id = vocab - 1 if image_token_id is None else image_token_id
    video_token_id = image_token_id if video_token_id is None else video_token_id
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=text.tie_word_embeddings,
    )

    manager = None
    if has_managers(original):
        manager = _convert_manager_config(original, im_start_token_id)
    return config, manager, layout


def _pinpoints(value, crop: int) -> list[list[int]]:
    """Original pinpoints as (w, h) pairs: a list, or a string like "(1x1),...,(6x6)" in units of `crop`."""
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if not grids:
            raise ConversionError(f"image_grid_pinpoints={value!r} is not understood")
        lo, hi = [int(v) for v in grids[0]], [int(v) for v in grids[-1]]
        return [[i * crop, j * crop] for i in range(lo[0], hi[0] + 1) for j in range(lo[1], hi[1] + 1)]
    if not value:
        raise ConversionError("an anyres checkpoint needs image_grid_pinpoints")
    return [list(p) for p in value]


def _convert_manager_config(original: dict, im_start_token_id: int | None) -> ManagerConfig:
    manager_type = original["mm_manager_type"]
    if manager_type not in MANAGER_TYPES:
        raise ConversionError(f"mm_manager_type={manager_type!r} is not one of {sorted(MANAGER_TYPES)}")
    if original.get("mm_manager_residual", True) is not True:
        raise ConversionError("mm_manager_residual must be true: the released Managers are residual")
    grid = original.get("mm_manager_grid_type", "all")
    if grid not in GRID_TYPES:
        raise ConversionError(f"mm_manager_grid_type={grid!r} is not one of {sorted(GRID_TYPES)}")
    vision_layers = original.get("mm_manager_select_layer_index_list") or list(
        range(
            original["mm_manager_vision_select_layers_start"],
            original["mm_manager_vision_select_layers_end"],
            original.get("mm_manager_vision_select_layers_interval", 1),
        )
    )
    llm_layers = original.get("mm_manager_index_list") or list(
        range(
            original["mm_manager_injection_start"],
            min(original["num_hidden_layers"], original["mm_manager_injection_end"]),
            original.get("mm_manager_injection_interval", 1),
        )
    )
    query_token_id = im_start_token_id
    if query_token_id is None and original["vocab_size"] > QWEN2_IM_START_ID:
        query_token_id = QWEN2_IM_START_ID
    return ManagerConfig(
        manager_type=MANAGER_TYPES[manager_type],
        vision_layers=list(vision_layers),
        llm_layers=list(llm_layers),
        grid=GRID_TYPES[grid],
        jitter=0.01,
        layer_embedding=True,
        query_token_id=query_token_id if MANAGER_TYPES[manager_type] != "static" else None,
    )


# ---- weights ------------------------------------------------------------------------------------------------


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded index)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (checkpoint_dir / s).is_file()]
        if missing:
            raise ConversionError(f"{index} lists shards that are missing: {missing[:3]}")
        return [checkpoint_dir / s for s in shards]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if files:
        return files
    if list(checkpoint_dir.glob("*.bin")) or list(checkpoint_dir.glob("*.pt")):
        raise ConversionError(
            f"{checkpoint_dir} has only pickle weights (*.bin): they can run code when loaded, so they are refused. "
            "Convert them to safetensors, or opt in with llava_manager.from_pretrained(..., allow_pickle=True)."
        )
    raise ConversionError(f"{checkpoint_dir} has no weights (model.safetensors or *.safetensors)")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as error:
            raise ConversionError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    return state


def map_key(key: str) -> str | None:
    """Original key -> transformers key of the patched model (None: drop it)."""
    if key.startswith(_VISION_PREFIX):
        rest = key[len(_VISION_PREFIX) :]
        return None if rest.startswith("head.") else "model.vision_tower." + rest
    if key.startswith("model.mm_projector."):
        index, _, param = key[len("model.mm_projector.") :].partition(".")
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        if linear is None:
            raise ConversionError(f"unexpected projector key {key!r} (mlp2x_gelu has layers 0 and 2)")
        return f"model.multi_modal_projector.{linear}.{param}"
    if key == "model.image_newline":
        return "model.image_newline"
    if key == "model.manager_layer_embedding":
        return "model.manager.layer_embedding.weight"
    match = re.fullmatch(r"model\.manager\.(\d+)\.(.+)", key)
    if match:
        return f"model.manager.managers.{match.group(1)}.{match.group(2)}"
    if key == "lm_head.weight":
        return "lm_head.weight"
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    raise ConversionError(f"unexpected key {key!r} in an original LLaVA-OV checkpoint")


def tokenizer_token_ids(checkpoint_dir: Path, vocab_size: int) -> dict[str, int]:
    """Ids from the tokenizer saved beside the weights, if any: `<|im_start|>`, and `<image>` / `<video>` (the ids
    they have, or the ids they get when appended to the tokenizer, as the processor does)."""
    if not any((checkpoint_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return {}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except Exception:  # an unreadable tokenizer is the processor's problem, not the conversion's
        return {}
    vocab = tokenizer.get_vocab()
    ids = {}
    if "<|im_start|>" in vocab:
        ids["im_start"] = vocab["<|im_start|>"]
    next_id = len(tokenizer)
    for name, token in (("image", "<image>"), ("video", "<video>")):
        if token in vocab:
            ids[name] = vocab[token]
        elif next_id < vocab_size:
            ids[name], next_id = next_id, next_id + 1
    return ids


def _count_vision_layers(keys) -> int:
    pattern = re.compile(re.escape(_VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not indices:
        raise ConversionError("the checkpoint has no vision tower weights (model.vision_tower.vision_tower...)")
    return max(indices) + 1


def load_original(
    path: str | os.PathLike,
    *,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    im_start_token_id: int | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> LlavaOnevisionForConditionalGeneration:
    """Convert an original-format checkpoint directory into an equivalent patched transformers model.

    Args:
        path (`str` or `os.PathLike`): directory with the original `config.json` and safetensors weights.
        image_token_id (`int`, *optional*): in-vocabulary id of the `<image>` token (defaults to the last row of the
            embedding, which the original never uses; processors built by `from_pretrained` pass their own).
        video_token_id (`int`, *optional*): id of `<video>` (defaults to the image token id; the original has no
            video support).
        im_start_token_id (`int`, *optional*): id of `<|im_start|>` for adaptive Managers (defaults to Qwen2's
            151644 when the vocabulary has it).
        dtype (`torch.dtype` or `"auto"`, *optional*): defaults to float32; `"auto"` keeps the checkpoint's dtype.
        attn_implementation (`str`, *optional*): e.g. `"eager"` or `"sdpa"`.
        state_dict (`dict`, *optional*): the original weights, if already read (else read from `path`).

    Returns:
        A `LlavaOnevisionManagerForConditionalGeneration` in eval mode: Managers as saved (or none for the
        `Baseline` checkpoints) and the original image layout (truncating unpad; square mode without grids).
    """
    from .patch import patch_llava

    checkpoint_dir = Path(path)
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{checkpoint_dir} has no config.json")
    original = json.loads(config_file.read_text())
    if not is_original_format(original):
        raise ConversionError(
            f"{config_file} is not an original LLaVA-OV (LLaVA-NeXT) config: it lacks mm_vision_tower / a "
            "LlavaQwen*ForCausalLM architecture"
        )
    if state_dict is None:
        state_dict = read_state_dict(weight_files(checkpoint_dir))
    tokenizer_ids = tokenizer_token_ids(checkpoint_dir, original["vocab_size"])
    image_token_id = tokenizer_ids.get("image") if image_token_id is None else image_token_id
    video_token_id = tokenizer_ids.get("video") if video_token_id is None else video_token_id
    im_start_token_id = tokenizer_ids.get("im_start") if im_start_token_id is None else im_start_token_id
    hf_config, manager_config, layout = convert_config(
        original,
        checkpoint_dir=checkpoint_dir,
        num_vision_layers=_count_vision_layers(state_dict),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        im_start_token_id=im_start_token_id,
    )
    if dtype == "auto":
        dtype = next(iter(state_dict.values())).dtype
    dtype = dtype or torch.float32
    from transformers.initialization import no_init_weights

    with no_init_weights():  # allocate only: every weight is overwritten below
        model = LlavaOnevisionForConditionalGeneration._from_config(
            hf_config, dtype=dtype, attn_implementation=attn_implementation
        )
    patch_llava(model, manager_config, layout=layout, managers=manager_config is not None)
    _load_mapped(model, state_dict, tied=hf_config.tie_word_embeddings, square=layout.mode == "square", dtype=dtype)
    return model.eval()


def _load_mapped(model, state_dict, *, tied: bool, square: bool, dtype) -> None:
    """Rename, reshape and shape-check the original weights, then load them (strict)."""
    expected = {name: tensor for name, tensor in model.state_dict().items()}
    mapped = {}
    for key in sorted(state_dict):
        target = map_key(key)
        if target is None:
            continue
        if target not in expected:
            raise ConversionError(
                f"checkpoint key {key!r} (-> {target!r}) has no place in the model built from its config.json; "
                "the config and the weights disagree"
            )
        tensor = state_dict[key]
        want = tuple(expected[target].shape)
        if tuple(tensor.shape) != want:
            if tensor.numel() == expected[target].numel() and target.startswith("model.manager.managers."):
                tensor = tensor.reshape(want)  # (1, N, 1, D) -> (N, D)
            else:
                raise ConversionError(
                    f"checkpoint key {key!r} has shape {tuple(tensor.shape)} but its config.json implies {want} "
                    f"for {target!r}; the config and the weights disagree"
                )
        mapped[target] = tensor.to(dtype)
    optional = {"model.image_newline"} if square else set()
    if tied:
        optional.add("lm_head.weight")
    missing = [name for name in expected if name not in mapped and name not in optional]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    if square and "model.image_newline" not in mapped:  # never used in square mode
        mapped["model.image_newline"] = torch.zeros(expected["model.image_newline"].shape, dtype=dtype)
    if "lm_head.weight" not in mapped:
        mapped["lm_head.weight"] = mapped["model.language_model.embed_tokens.weight"]
    model.load_state_dict(mapped, strict=True)
    if tied:
        model.tie_weights()
