"""`ManagerConfig` (what the Managers are) and `ImageLayout` (how image tokens are laid out).

Both are plain dataclasses that serialise to a dict (stored in the model's `config.json`).
`ManagerConfig.resolve(model_config)` checks every field against a concrete LLaVA-OV model and
returns a copy with the defaults filled in; it raises `ManagerConfigError` (a `ValueError`)
naming the field, the value and the range allowed for that model.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ManagerConfigError, ManagerError  # noqa: F401  (re-exported: their old home)

MANAGER_TYPES = ("static", "adaptive", "adaptive_last", "adaptive_average", "adaptive_cross", "bridge", "tower")
ADAPTIVE_TYPES = ("adaptive", "adaptive_last", "adaptive_average", "adaptive_cross")
INJECTIONS = ("llm", "projector")
GRIDS = ("all", "base", "grid")
LAYOUT_MODES = ("anyres", "square")
UNPAD_MODES = ("round", "truncate")


def _bad(field_name: str, value: Any, allowed: str) -> ManagerConfigError:
    return ManagerConfigError(f"ManagerConfig.{field_name}={value!r} is invalid: {allowed}.")


@dataclass
class ManagerConfig:
    """Settings of the Managers added by `patch_llava`.

    Args:
        manager_type (`str`, *optional*, defaults to `"static"`):
            `"static"`: the released `static_zerouni` Manager, one zero-initialised weight per selected vision
            layer and channel. `"adaptive"`, `"adaptive_last"`, `"adaptive_average"`, `"adaptive_cross"`: per-token
            scores from the LLM hidden state (optionally with the instruction as a query), gated by a
            zero-initialised `zero_gate`; the Manager at LLM layer 0 is static with these types. `"bridge"`
            (BridgeTower-style): each Manager reads one SigLIP layer (`bridge_layers`), scaled per channel by a
            zero-initialised weight. `"tower"` (ManagerTower's SAUM): a LayerNorm per layer, softmax weights with a
            learnable temperature, and a zero-initialised per-channel gate. Bridge and tower Managers read the same
            layers at every injection point, layer 0 included (the "all but the last layer at layer 0" rule belongs
            to the released static Manager). See `managers.py` for the formulas.
        vision_layers (`list[int]`, *optional*):
            Indices into the SigLIP `hidden_states` tuple (0 = embeddings, i = output of layer i, before
            `post_layernorm`). Defaults to the paper's "top half" rule: `range(L // 2, L)` for a tower of `L`
            layers, i.e. 13..25 on LLaVA-OV's 26-layer SigLIP. The main visual feature (entry `L`) is not included.
        injection (`str`, *optional*, defaults to `"llm"`):
            `"llm"`: add the aggregated (projected) features to the LLM hidden states at the image-token positions
            before each of `llm_layers` (the paper's model). `"projector"`: add a zero-initialised residual of the
            selected SigLIP layers to the feature entering the projector (the LLM stays stock).
        llm_layers (`list[int]`, *optional*):
            Decoder layers that receive a Manager (`injection="llm"` only). Defaults to every 4th layer from 0:
            `range(0, n_llm_layers, 4)`, i.e. 0, 4, ..., 20 on a 24-layer LLM.
        grid (`str`, *optional*, defaults to `"all"`):
            Which image tokens get the Managers: `"all"`, `"base"` (the base crop only, the original's `"main"`) or
            `"grid"` (the AnyRes grid crops and their newline tokens only).
        jitter (`float`, *optional*, defaults to 0.01):
            Half-width of the multiplicative training-time noise `U(1 - jitter, 1 + jitter)` on the Manager
            weights, drawn fresh every forward. Never applied in eval mode.
        layer_embedding (`bool`, *optional*, defaults to `True`):
            Add a learned per-layer embedding to each projected vision layer.
        query_token_id (`int`, *optional*):
            Token id of `<|im_start|>`, used by the adaptive Managers to find the instruction tokens (151644 for
            Qwen2 tokenizers). Required for the adaptive types.
        video (`bool`, *optional*, defaults to `True`):
            Manage the video tokens too (each frame's selected layers, projected and pooled like the main video
            feature; see `video.py`). `False` leaves video tokens as transformers computes them.
        bridge_layers (`list[int]`, *optional*):
            `manager_type="bridge"` only: the SigLIP `hidden_states` index each Manager reads, one per entry of
            `llm_layers` in order (one for `injection="projector"`); each must be one of `vision_layers`. Defaults to
            the top `len(llm_layers)` selected layers, bottom to top (BridgeTower's one-to-one mapping: with the
            defaults, layers 20..25 into LLM layers 0, 4, ..., 20).

    Example:

    ```python
    >>> from llava_manager import ManagerConfig, patch_llava
    >>> model = patch_llava(model, ManagerConfig(llm_layers=[0, 8, 16], grid="base"))
    ```
    """

    manager_type: Literal["static", "adaptive", "adaptive_last", "adaptive_average", "adaptive_cross"] = field(
        default="static", metadata={"help": "static | adaptive | adaptive_last | adaptive_average | adaptive_cross"}
    )
    vision_layers: list[int] | None = field(
        default=None, metadata={"help": "SigLIP hidden_states indices (default: top half, 13..25 on 26 layers)"}
    )
    injection: Literal["llm", "projector"] = field(default="llm", metadata={"help": "llm | projector"})
    llm_layers: list[int] | None = field(
        default=None, metadata={"help": "decoder layers that get a Manager (default: every 4th from 0)"}
    )
    grid: Literal["all", "base", "grid"] = field(default="all", metadata={"help": "all | base | grid"})
    jitter: float = field(default=0.01, metadata={"help": "training-time multiplicative noise half-width"})
    layer_embedding: bool = field(default=True, metadata={"help": "learned embedding per vision layer"})
    query_token_id: int | None = field(default=None, metadata={"help": "<|im_start|> id (adaptive types)"})
    bridge_layers: list[int] | None = field(
        default=None, metadata={"help": "bridge only: SigLIP layer per Manager (default: top len(llm_layers))"}
    )
    video: bool = field(default=True, metadata={"help": "manage video tokens too"})

    def __post_init__(self):
        if self.manager_type not in MANAGER_TYPES:
            raise _bad("manager_type", self.manager_type, f"choose one of {', '.join(MANAGER_TYPES)}")
        if self.injection not in INJECTIONS:
            raise _bad("injection", self.injection, f"choose one of {', '.join(INJECTIONS)}")
        if self.grid not in GRIDS:
            hint = " (the original's 'main' is called 'base' here)" if self.grid == "main" else ""
            raise _bad("grid", self.grid, f"choose one of {', '.join(GRIDS)}{hint}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise _bad("jitter", self.jitter, "use a number in [0, 1)")
        self.jitter = float(self.jitter)
        if not isinstance(self.layer_embedding, bool):
            raise _bad("layer_embedding", self.layer_embedding, "use True or False")
        if not isinstance(self.video, bool):
            raise _bad("video", self.video, "use True or False")
        for name in ("vision_layers", "llm_layers", "bridge_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple, range)):  # a dict or set would be read by its keys, unordered
                raise _bad(name, value, "use a list of layer indices")
            value = list(value)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise _bad(name, value, "use a list of integer layer indices")
            if name != "bridge_layers" and len(set(value)) != len(value):  # two Managers may bridge one layer
                raise _bad(name, value, "indices must be unique")
            setattr(self, name, value)
        if self.query_token_id is not None and (
            not isinstance(self.query_token_id, int)
            or isinstance(self.query_token_id, bool)
            or self.query_token_id < 0
        ):
            raise _bad("query_token_id", self.query_token_id, "use a non-negative token id")
        if self.bridge_layers is not None and self.manager_type != "bridge":
            raise _bad(
                "bridge_layers",
                self.bridge_layers,
                f"only manager_type='bridge' reads it (this config has {self.manager_type!r}); leave it None",
            )
        if self.injection == "projector" and self.is_adaptive:
            raise _bad(
                "manager_type",
                self.manager_type,
                "adaptive Managers read the LLM hidden state, so they need injection='llm'; use 'static' with "
                "injection='projector'",
            )

    @property
    def is_adaptive(self) -> bool:
        """Whether the Managers read the LLM hidden state (and the instruction): the `adaptive*` types."""
        return self.manager_type in ADAPTIVE_TYPES

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManagerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ManagerConfig: ignoring unknown keys {unknown} (saved by another version?)", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    # ---- validation against a model ----------------------------------------------------------------
    def resolve(self, model_config, layout: ImageLayout | None = None) -> ManagerConfig:
        """Return a copy with defaults filled in for `model_config` (a `LlavaOnevisionConfig`), or raise.

        The fields are checked again first: they may have been changed since the config was made."""
        return dataclasses.replace(self)._resolve(model_config, layout)

    def _resolve(self, model_config, layout: ImageLayout | None) -> ManagerConfig:
        n_vision = model_config.vision_config.num_hidden_layers
        n_llm = model_config.text_config.num_hidden_layers
        vision_layers = list(self.vision_layers) if self.vision_layers is not None else default_vision_layers(n_vision)
        vision_layers = [v + n_vision + 1 if v < 0 else v for v in vision_layers]
        if not vision_layers or any(not 0 <= v <= n_vision for v in vision_layers):
            raise _bad(
                "vision_layers",
                self.vision_layers,
                f"this model's SigLIP has {n_vision} layers, so indices must lie in 0..{n_vision} "
                f"(0 = embeddings, {n_vision} = last layer) and the list must not be empty",
            )
        if len(set(vision_layers)) != len(vision_layers):
            raise _bad("vision_layers", self.vision_layers, "indices must be unique after resolving negative ones")

        if self.injection == "llm":
            llm_layers = list(self.llm_layers) if self.llm_layers is not None else list(range(0, n_llm, 4))
            if not llm_layers or any(not 0 <= k < n_llm for k in llm_layers):
                raise _bad(
                    "llm_layers",
                    self.llm_layers,
                    f"this model's LLM has {n_llm} decoder layers, so indices must lie in 0..{n_llm - 1} "
                    "and the list must not be empty",
                )
            given_order = llm_layers
            llm_layers = sorted(llm_layers)
            if 0 in llm_layers and len(vision_layers) < 2:
                raise _bad(
                    "vision_layers",
                    vision_layers,
                    "the Manager at LLM layer 0 uses all selected layers but the last (as released), so select at "
                    "least 2 vision layers or leave layer 0 out of llm_layers",
                )
        else:
            if self.llm_layers:
                raise _bad("llm_layers", self.llm_layers, "injection='projector' has no LLM layers; leave it None")
            llm_layers = given_order = []

        vfl = model_config.vision_feature_layer
        if not isinstance(vfl, int):
            raise ManagerConfigError(
                f"this model's vision_feature_layer={vfl!r} concatenates several layers; Managers need a model with "
                "a single vision_feature_layer (LLaVA-OV uses -1)."
            )
        bridge_layers = self._resolve_bridge_layers(vision_layers, given_order, n_vision)
        if self.is_adaptive:
            vocab = model_config.text_config.vocab_size
            if self.query_token_id is None or not self.query_token_id < vocab:
                raise _bad(
                    "query_token_id",
                    self.query_token_id,
                    f"adaptive Managers need the id of <|im_start|> (151644 for Qwen2 tokenizers) below the "
                    f"vocabulary size {vocab}; pass query_token_id=tokenizer.convert_tokens_to_ids('<|im_start|>')",
                )
        if layout is not None and layout.mode == "square" and self.grid == "grid":
            raise _bad("grid", self.grid, "square images have no grid crops, so grid='grid' would touch no token")
        return dataclasses.replace(
            self, vision_layers=vision_layers, llm_layers=llm_layers, bridge_layers=bridge_layers
        )

    def _resolve_bridge_layers(self, vision_layers: list[int], given_order: list[int], n_vision: int):
        """`bridge_layers` in the order of the sorted `llm_layers`, with negative indices resolved and the default
        filled in (None for other types). `given_order`: `llm_layers` as given, which `bridge_layers` pairs with."""
        llm_layers = sorted(given_order)
        if self.manager_type != "bridge":
            return None
        managers = len(llm_layers) if self.injection == "llm" else 1
        if self.bridge_layers is None:
            if managers > len(vision_layers):
                raise _bad(
                    "bridge_layers",
                    None,
                    f"the default bridges the top {managers} selected vision layers into the {managers} Managers, "
                    f"but only {len(vision_layers)} are selected ({vision_layers}); select more vision_layers, "
                    "fewer llm_layers, or give bridge_layers (one selected layer per Manager, repeats allowed)",
                )
            return sorted(vision_layers)[len(vision_layers) - managers :]
        bridge_layers = [v + n_vision + 1 if v < 0 else v for v in self.bridge_layers]
        if len(bridge_layers) != managers:
            raise _bad(
                "bridge_layers",
                self.bridge_layers,
                f"give one vision layer per Manager: {managers} (one per entry of llm_layers {llm_layers})"
                if self.injection == "llm"
                else "injection='projector' has one Manager, so give one vision layer",
            )
        missing = [v for v in bridge_layers if v not in vision_layers]
        if missing:
            raise _bad(
                "bridge_layers",
                self.bridge_layers,
                f"layers {missing} are not among the selected vision_layers {vision_layers}; add them there",
            )
        return (
            [layer for _, layer in sorted(zip(given_order, bridge_layers))]
            if self.injection == "llm"
            else bridge_layers
        )


def default_vision_layers(n_vision_layers: int) -> list[int]:
    """The paper's "top half" rule: hidden_states entries `L//2 .. L-1` of an `L`-layer tower (13..25 for 26)."""
    return list(range(n_vision_layers // 2, n_vision_layers))


@dataclass
class ImageLayout:
    """How image features become image tokens.

    Args:
        mode (`str`, *optional*, defaults to `"anyres"`):
            `"anyres"`: LLaVA-OV's multi-crop layout (base crop, unpadded grid, `anyres_max_N` shrink, newline
            tokens), as in transformers. `"square"`: one crop per image (the whole image resized), no newline:
            the no-grid checkpoints of the paper (`square` + `flat`).
        unpad (`str`, *optional*, defaults to `"round"`):
            `"round"`: transformers' unpad arithmetic (`int(round(x, 7))`). `"truncate"`: the original
            LLaVA-NeXT arithmetic (`int(x)`), needed by converted original checkpoints; the two differ for about
            1 in 10^5 image sizes.
    """

    mode: Literal["anyres", "square"] = "anyres"
    unpad: Literal["round", "truncate"] = "round"

    def __post_init__(self):
        if self.mode not in LAYOUT_MODES:
            raise ManagerConfigError(f"ImageLayout.mode={self.mode!r} is invalid: choose one of {LAYOUT_MODES}.")
        if self.unpad not in UNPAD_MODES:
            raise ManagerConfigError(f"ImageLayout.unpad={self.unpad!r} is invalid: choose one of {UNPAD_MODES}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ImageLayout:
        return cls(**(data or {}))

    @property
    def is_default(self) -> bool:
        return self == ImageLayout()
