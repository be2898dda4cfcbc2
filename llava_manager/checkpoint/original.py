"""Original LLaVA-NeXT-format checkpoints (the authors' `LlavaQwenManagerForCausalLM` / `LlavaQwenForCausalLM`)
-> patched transformers LLaVA-OV models. Pure conversion: config mapping, key mapping, shape checks.

Finding the folder (source.py), reading its weights (weights.py), caching and writing an HF-format folder with its
processor (conversion.py, assembly.py) live beside this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from ..config import ImageLayout, ManagerConfig
from ..errors import ConversionError
from .files import has_tokenizer_files
from .formats import has_managers, is_original_format
from .weights import check_weights, read_weights

logger = logging.getLogger(__name__)

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

#: the original `mm_manager_type` -> our `ManagerConfig.manager_type`
ORIGINAL_MANAGER_TYPES = {
    "static_zerouni": "static",
    "adaptive_zerouni": "adaptive",
    "adaptive_last_zerouni": "adaptive_last",
    "adaptive_average_zerouni": "adaptive_average",
    "adaptive_cross_zerouni": "adaptive_cross",
}
#: the original `mm_manager_grid_type` -> our `ManagerConfig.grid`
ORIGINAL_GRID_TYPES = {"all": "all", "main": "base", "grid": "grid"}
QWEN2_IM_START_ID = 151644

_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


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
            keys = [
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
                "hidden_act",
                "layer_norm_eps",
                "attention_dropout",
                "num_channels",
            ]
            return {k: data[k] for k in keys if k in data}
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:  # a tower the user has in the Hugging Face cache
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:  # a name that cannot be a Hub id (a relative path that is not there)
        cached = None
    if isinstance(cached, str):
        return _vision_tower_config(str(Path(cached).parent), [])
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
        pinpoints = _original_pinpoints(original.get("image_grid_pinpoints"), crop)
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


def expand_pinpoint_range(text: str, crop: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoint range `"(1x1),...,(6x6)"` as transformers' `[height, width]` pixel pairs.

    The original (`llava/mm_utils.py`) reads the first and last `(AxB)` as grids of `crop`-sized crops, A across
    (width) and B down (height), and lists (width, height) pairs with A outer; the order is kept, since
    `select_best_resolution` breaks ties by taking the first. The one reader of this string: recipes and
    conversion both call it.
    """
    grids = re.findall(r"\((\d+)x(\d+)\)", text) if isinstance(text, str) else []
    if not grids:
        raise ConversionError(f"image_grid_pinpoints={text!r} is not understood: use a range like '(1x1),...,(6x6)'")
    (first_w, first_h), (last_w, last_h) = [[int(v) for v in grid] for grid in (grids[0], grids[-1])]
    if min(first_w, first_h) < 1 or first_w > last_w or first_h > last_h:
        raise ConversionError(
            f"image_grid_pinpoints={text!r} is not a range: the first grid must be at least (1x1) and not larger "
            "than the last, as in '(1x1),...,(6x6)'"
        )
    return [[h * crop, w * crop] for w in range(first_w, last_w + 1) for h in range(first_h, last_h + 1)]


def _original_pinpoints(value, crop: int) -> list[list[int]]:
    """The original `image_grid_pinpoints` (a range string, or a list of (width, height) pairs) as [height, width]."""
    if isinstance(value, str):
        return expand_pinpoint_range(value, crop)
    if not value:
        raise ConversionError("an anyres checkpoint needs image_grid_pinpoints")
    return [[int(h), int(w)] for w, h in value]


def _convert_manager_config(original: dict, im_start_token_id: int | None) -> ManagerConfig:
    manager_type = original["mm_manager_type"]
    if manager_type not in ORIGINAL_MANAGER_TYPES:
        raise ConversionError(f"mm_manager_type={manager_type!r} is not one of {sorted(ORIGINAL_MANAGER_TYPES)}")
    if original.get("mm_manager_residual", True) is not True:
        raise ConversionError("mm_manager_residual must be true: the released Managers are residual")
    grid = original.get("mm_manager_grid_type", "all")
    if grid not in ORIGINAL_GRID_TYPES:
        raise ConversionError(f"mm_manager_grid_type={grid!r} is not one of {sorted(ORIGINAL_GRID_TYPES)}")
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
        manager_type=ORIGINAL_MANAGER_TYPES[manager_type],
        vision_layers=list(vision_layers),
        llm_layers=list(llm_layers),
        grid=ORIGINAL_GRID_TYPES[grid],
        jitter=0.01,
        layer_embedding=True,
        query_token_id=query_token_id if ORIGINAL_MANAGER_TYPES[manager_type] != "static" else None,
    )


# ---- weights ------------------------------------------------------------------------------------------------


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
    if not has_tokenizer_files(checkpoint_dir):
        return {}
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except (OSError, ValueError, TypeError, KeyError) as error:  # AutoTokenizer's ways of saying "cannot read it"
        logger.warning(
            "the tokenizer in %s cannot be read (%s); the <image>/<video>/<|im_start|> ids come from the arguments "
            "or their defaults",
            checkpoint_dir,
            error,
        )
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
    from ..patch import patch_llava

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
        state_dict = read_weights(*check_weights(checkpoint_dir))
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
    expected = dict(model.state_dict())
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
