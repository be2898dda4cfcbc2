"""Compose a fresh LLaVA-OneVision from unimodal experts, as the paper's stage 1 starts.

A SigLIP vision model (its last layer dropped, as LLaVA-OV does: SigLIP so400m has 27 layers, LLaVA-OV keeps 26
and reads the output of the last one kept) and a causal LM (Qwen2) become one HF-format LLaVA-OV folder:

- a new `mlp2x_gelu` projector (`Linear -> GELU -> Linear`, PyTorch's default `nn.Linear` initialisation, as
  LLaVA-NeXT builds it) and a new `image_newline` drawn from `N(0, 1/D)` (LLaVA-NeXT's `embed_std`);
- the LM's tokenizer with `<image>` / `<video>` added (embedding rows added, mean-initialised, only when the
  vocabulary has no spare rows), left padding and the ChatML chat template;
- the processor (SigLIP normalisation, AnyRes pinpoints `(1x1),...,(6x6)` of the crop size, `anyres_max_9`);
- `compose_info.json`: where each part came from.

No Managers: `stage1` patches the model with its recipe's Managers and trains them with the projector, the two
towers frozen. The folder appears only when everything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConversionError, ManagerError
from ..extras import require_extra
from .folders import atomic_directory

OV_PINPOINTS = "(1x1),...,(6x6)"  # LLaVA-OV's grids, in crops
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPOSE_INFO = "compose_info.json"


@dataclass
class ComposeInfo:
    """What `compose_llava_onevision` built, also written to `compose_info.json`."""

    vision: str
    llm: str
    vision_layers_kept: int
    vision_layers_source: int
    llm_layers: int
    added_tokens: list[str]
    embedding_rows: int
    dtype: str
    seed: int
    new_parameters: int


def compose_llava_onevision(
    vision: str | os.PathLike,
    llm: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    vision_aspect_ratio: str = "anyres_max_9",
    pinpoints: str = OV_PINPOINTS,
    drop_last_vision_layer: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    **hub_kwargs,
) -> ComposeInfo:
    """Write a fresh HF-format LLaVA-OV (no Managers) composed of `vision` and `llm` to `out_dir`.

    Args:
        vision (path or Hub id): a SigLIP vision model (`SiglipVisionModel`, or a full `SiglipModel` checkpoint such
            as `google/siglip-so400m-patch14-384`, whose vision half is taken).
        llm (path or Hub id): a causal LM with its tokenizer (e.g. `Qwen/Qwen2-0.5B-Instruct`).
        out_dir (path): the output folder; must not exist (or be empty) unless `overwrite`.
        dtype (`str`, *optional*, defaults to `"auto"`): weights' dtype; `"auto"` keeps the LM's.
        vision_aspect_ratio (`str`, *optional*): `anyres_max_N` (LLaVA-OV: 9).
        pinpoints (`str`, *optional*): AnyRes grids as LLaVA-NeXT writes them, in crops.
        drop_last_vision_layer (`bool`, *optional*, defaults to `True`): as LLaVA-OV does.
        seed (`int`, *optional*): seeds the new projector and `image_newline`.
        overwrite (`bool`, *optional*): replace an existing `out_dir` (atomically).
        hub_kwargs: `cache_dir`, `token`, `local_files_only`, `revision`, passed to `from_pretrained`.

    Returns:
        `ComposeInfo`.
    """
    require_extra("vision", "composing a model (it writes transformers' LLaVA-OV processor, video part included)")
    if dtype not in DTYPES:
        raise ManagerError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ManagerError(f"{out_dir} already exists and is not empty; choose a new folder or pass overwrite=True")
    from .assembly import build_processor, load_tokenizer, prepare_tokenizer

    vision_model = _load_vision(vision, hub_kwargs)
    llm_model = _load_llm(llm, hub_kwargs)
    raw_tokenizer = load_tokenizer(llm, hub_kwargs)
    added = [token for token in ("<image>", "<video>") if token not in raw_tokenizer.get_vocab()]
    tokenizer = prepare_tokenizer(raw_tokenizer)
    model, info = _compose(
        vision_model,
        llm_model,
        tokenizer,
        added,
        dtype=dtype,
        vision_aspect_ratio=vision_aspect_ratio,
        pinpoints=pinpoints,
        drop_last_vision_layer=drop_last_vision_layer,
        seed=seed,
    )
    info.vision, info.llm = os.fspath(vision), os.fspath(llm)
    processor = build_processor(model.config, tokenizer)
    with atomic_directory(out_dir, replace=overwrite) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        (temporary / COMPOSE_INFO).write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    return info


# ---- reading the experts ------------------------------------------------------------------------------------------
def _load_vision(source, hub_kwargs):
    from transformers import SiglipVisionModel

    config = _config_of(source, "--vision", hub_kwargs)
    model_type = getattr(config, "model_type", None)
    if model_type not in ("siglip", "siglip_vision_model"):
        raise ConversionError(
            f"--vision {os.fspath(source)}: a {model_type!r} model; LLaVA-OV's vision tower is SigLIP (e.g. "
            "google/siglip-so400m-patch14-384)"
        )
    return SiglipVisionModel.from_pretrained(os.fspath(source), **hub_kwargs).eval()


def _load_llm(source, hub_kwargs):
    from transformers import AutoModelForCausalLM

    config = _config_of(source, "--llm", hub_kwargs)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", "").startswith(
        ("siglip", "llava")
    ):
        raise ConversionError(
            f"--llm {os.fspath(source)}: a {config.model_type!r} model; give a decoder-only causal LM such as "
            "Qwen/Qwen2-0.5B-Instruct"
        )
    model = AutoModelForCausalLM.from_pretrained(os.fspath(source), dtype="auto", **hub_kwargs).eval()
    if not hasattr(model, "model") or model.get_output_embeddings() is None:
        raise ConversionError(f"--llm {os.fspath(source)}: {type(model).__name__} has no decoder and LM head to reuse")
    return model


def _config_of(source, flag: str, hub_kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(os.fspath(source), **hub_kwargs)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"{flag} {os.fspath(source)}: not a model folder or Hub id transformers reads ({error})"
        ) from None


# ---- composing ----------------------------------------------------------------------------------------------------
def _compose(
    vision_model, llm_model, tokenizer, added, *, dtype, vision_aspect_ratio, pinpoints, drop_last_vision_layer, seed
):
    """The composed `LlavaOnevisionForConditionalGeneration` (eval mode) and its `ComposeInfo`."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.initialization import no_init_weights

    from .original import expand_pinpoint_range

    torch_dtype = llm_model.dtype if dtype == "auto" else getattr(torch, dtype)
    vision_config = vision_model.config.__class__.from_dict(vision_model.config.to_dict())
    source_layers = vision_config.num_hidden_layers
    if drop_last_vision_layer:
        if source_layers < 2:
            raise ConversionError(f"--vision has {source_layers} layer(s); dropping the last would leave none")
        vision_config.num_hidden_layers = source_layers - 1
    vision_config.vision_use_head = False  # LLaVA-OV reads patch tokens, not SigLIP's pooling head
    text_config = llm_model.config.__class__.from_dict(llm_model.config.to_dict())
    rows = llm_model.get_input_embeddings().weight.shape[0]
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=expand_pinpoint_range(pinpoints, vision_config.image_size),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with no_init_weights():  # allocate only: every weight is assigned below
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch_dtype)
    state = _expert_weights(vision_model, llm_model, vision_config.num_hidden_layers)
    state.update(_new_weights(model, seed))
    state = {k: v.detach().to(torch_dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConversionError(
            f"composing: weights that do not fit LLaVA-OV (missing {sorted(set(missing) - tied)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); is --vision a SigLIP and --llm a decoder LM transformers' LLaVA-OV supports?"
        )
    model.tie_weights()
    if len(tokenizer) > rows:  # the new tokens have no spare row: add rows (mean of the others, as transformers does)
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    new_parameters = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    info = ComposeInfo(
        vision="",
        llm="",
        vision_layers_kept=vision_config.num_hidden_layers,
        vision_layers_source=source_layers,
        llm_layers=text_config.num_hidden_layers,
        added_tokens=added,
        embedding_rows=model.get_input_embeddings().weight.shape[0],
        dtype=str(torch_dtype).removeprefix("torch."),
        seed=seed,
        new_parameters=new_parameters + model.model.image_newline.numel(),
    )
    return model.eval(), info


_VISION_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def _expert_weights(vision_model, llm_model, vision_layers: int) -> dict:
    """The experts' tensors under LLaVA-OV's names, the vision layers from `vision_layers` on and SigLIP's pooling
    head left out. (transformers' LLaVA-OV holds the same SigLIP and LM classes, so the names inside match.)"""
    state = {}
    for name, tensor in vision_model.state_dict().items():
        layer = _VISION_LAYER.search(name)
        if name.startswith(("head.", "vision_model.head.")) or (layer and int(layer.group(1)) >= vision_layers):
            continue
        state[f"model.vision_tower.{name}"] = tensor
    for name, tensor in llm_model.model.state_dict().items():
        state[f"model.language_model.{name}"] = tensor
    state["lm_head.weight"] = llm_model.get_output_embeddings().weight
    return state


def _new_weights(model, seed: int) -> dict:
    """The new projector (PyTorch's default Linear initialisation, as LLaVA-NeXT builds it) and image_newline
    (N(0, 1/D)), seeded."""
    import torch
    from torch import nn

    state = {}
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's random state untouched
        torch.manual_seed(seed)
        for name, module in model.model.multi_modal_projector.named_children():
            if isinstance(module, nn.Linear):
                fresh = nn.Linear(
                    module.in_features, module.out_features, bias=module.bias is not None
                )  # reset_parameters
                state.update({f"model.multi_modal_projector.{name}.{k}": v for k, v in fresh.state_dict().items()})
        width = model.config.text_config.hidden_size
        state["model.image_newline"] = torch.randn(width) / math.sqrt(width)
    return state
