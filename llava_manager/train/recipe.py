"""Training recipes: one YAML file, every key overridable on the command line.

A recipe is a flat mapping (plus three small nested ones: `manager`, `learning_rates`, `lora`, and the
free-form `training_args`). `load_recipe(path, overrides)` reads the YAML, applies `--key value`
overrides (dotted keys reach into the nested mappings: `--learning_rates.manager 5e-5`,
`--manager.grid base`), and returns a validated `Recipe`. Every problem raises `RecipeError` naming
the key (and the file), before anything heavy is imported or any process group starts.

Relative paths are tried against the current directory first, then the recipe's directory. Bare
names resolve to the shipped configs: `deepspeed: zero3` -> `configs/deepspeed/zero3.json`,
`fsdp: fsdp2` -> `configs/fsdp/fsdp2.json`, `model_config: tiny` -> `configs/models/tiny.json`, and the recipe
itself: `tiny_cpu` -> `configs/recipes/tiny_cpu.yaml` (then `configs/ablations/`: the paper's ablations,
`layers_20_26` ...).

A recipe may start from another (`base: stage2_si`) and change only some keys; the nested mappings merge key by
key (`manager: {grid: base}` keeps the base's other Manager settings), `manager: null` removes the Managers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..chat_format import SYSTEM_PROMPT
from ..checkpoint.original import expand_pinpoint_range
from ..config import ManagerConfig
from ..errors import ConversionError, ManagerError, RecipeError  # noqa: F401  (RecipeError: re-exported)

PARTS = ("manager", "projector", "vision_tower", "language_model")
CONV_TEMPLATES = ("qwen_1_5", "plain")
IMAGE_CHECKS = ("none", "exists", "open")
BAD_IMAGE_ACTIONS = ("error", "skip")
FSDP_LOADINGS = ("accelerate", "sharded")
LORA_KEYS = {"r": int, "alpha": float, "dropout": float, "target": str}
DEFAULT_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
_ANYRES_MAX = re.compile(r"anyres_max_([1-9][0-9]*)")
_PINPOINT_RANGE = re.compile(r"\(\d+x\d+\),\s*\.\.\.,\s*\(\d+x\d+\)")  # the form recipes accept


def _shipped_roots() -> list[Path]:
    """Where the shipped `configs/` folder lives: package data (the repository's `configs/` links to it)."""
    return [Path(__file__).resolve().parents[1] / "resources" / "configs"]


def shipped_names(kind: str) -> list[str]:
    """The names of the shipped configs of `kind` ("recipes", "models", "deepspeed"), without suffix."""
    return sorted({path.stem for root in _shipped_roots() for path in (root / kind).glob("*.*") if path.is_file()})


def find_config(value: str, kind: str, suffixes: tuple[str, ...], base_dir: Path | None = None) -> Path | None:
    """Resolve `value` as a path (cwd, then `base_dir`) or as the name of a shipped config of `kind`."""
    candidates = [Path(value)]
    if base_dir is not None and not Path(value).is_absolute():
        candidates.append(base_dir / value)
    for root in _shipped_roots():
        candidates.append(root / kind / value)
        candidates += [root / kind / f"{value}{suffix}" for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None


@dataclass
class Recipe:
    """Everything one training run needs. See `configs/recipes/*.yaml` for commented examples."""

    # ---- model ---------------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "HF LLaVA-OV checkpoint (dir or hub id) or any format from_pretrained reads"}
    )
    model_subfolder: str | None = field(default=None, metadata={"help": "subfolder of model_name_or_path"})
    model_config: str | None = field(
        default=None, metadata={"help": "config JSON for a randomly initialised model (instead of model_name_or_path)"}
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "processor dir/hub id; 'tiny' = llava_manager.testing.tiny; default: the model's"},
    )
    manager: dict | None = field(
        default_factory=dict, metadata={"help": "ManagerConfig fields; null = train without Managers"}
    )
    image_aspect_ratio: str | None = field(
        default=None,
        metadata={"help": "square | anyres_max_N | anyres (no shrink; patched models only); default: the model's"},
    )
    image_grid_pinpoints: Any = field(
        default=None, metadata={"help": "[[h, w], ...] or '(1x1),...,(6x6)' in units of the crop size"}
    )
    # ---- what is trained, how fast ---------------------------------------------------------------
    train_parts: list = field(default_factory=lambda: ["manager", "projector"], metadata={"help": ", ".join(PARTS)})
    learning_rates: dict = field(default_factory=dict, metadata={"help": "learning rate per trained part"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases / norms)"})
    lora: dict | None = field(
        default=None, metadata={"help": "LoRA on the language model: {r, alpha, dropout, target (regex)}; null = off"}
    )
    # ---- data ------------------------------------------------------------------------------------
    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA JSON / JSONL, a YAML mixture, or synthetic:N (generated shapes)"}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "folder the samples' image paths are relative to"}
    )
    model_max_length: int = field(default=2048, metadata={"help": "tokens per sample; longer samples are truncated"})
    conv_template: str = field(default="qwen_1_5", metadata={"help": "qwen_1_5 (ChatML) | plain (captions)"})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "ChatML system message"})
    check_images: str = field(
        default="exists",
        metadata={"help": "before training: none | exists (stat every image) | open (decode every image)"},
    )
    on_bad_image: str = field(default="error", metadata={"help": "missing/unreadable image: error | skip (and count)"})
    video_folder: str | None = field(
        default=None, metadata={"help": "folder the samples' video paths (files or frame folders) are relative to"}
    )
    frames_upbound: int = field(
        default=32,
        metadata={"help": "frames per training video, sampled uniformly; exactly this many (short clips repeat)"},
    )
    check_videos: str = field(
        default="exists",
        metadata={"help": "before training: none | exists (stat every video) | open (decode every video)"},
    )
    on_bad_video: str = field(default="error", metadata={"help": "missing/unreadable video: error | skip (and count)"})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "batches of one modality, similar lengths"}
    )
    # ---- schedule --------------------------------------------------------------------------------
    output_dir: str = field(default="outputs/run", metadata={"help": "checkpoints and the final model"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "samples per device per micro-step"})
    gradient_accumulation_steps: Any = field(
        default=1, metadata={"help": "int, or 'auto' = global_batch_size / (per_device x world size)"}
    )
    global_batch_size: int | None = field(
        default=None, metadata={"help": "checked against per_device x accumulation x world size"}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "HF scheduler name"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps for linear warmup"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    deepspeed: Any = field(
        default=None, metadata={"help": "DeepSpeed JSON: path, shipped name (zero2, zero3, zero3_offload) or dict"}
    )
    zero3_init: bool = field(
        default=True,
        metadata={
            "help": "ZeRO-3: load / build the model already partitioned (deepspeed.zero.Init), so no rank holds it "
            "whole; false loads it whole on every rank and partitions it when training starts"
        },
    )
    fsdp: Any = field(
        default=None,
        metadata={
            "help": "PyTorch FSDP2 instead of DeepSpeed: TrainingArguments.fsdp_config as a JSON path, shipped name "
            "(fsdp2, fsdp2_offload) or mapping"
        },
    )
    fsdp_loading: str = field(
        default="accelerate",
        metadata={
            "help": "FSDP2: 'accelerate' (load whole, accelerate shards it when training starts) or 'sharded' "
            "(transformers' from_pretrained(distributed_config=...): each rank reads only its shard)"
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (0 = no checkpoints)"})
    save_total_limit: int | None = field(default=1, metadata={"help": "checkpoints kept"})
    seed: int = field(default=42, metadata={"help": "random seed (model init, data order, jitter)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading processes per rank"})
    cpu_threads: int | None = field(
        default=None, metadata={"help": "torch threads per process when training on CPU (null = torch's default)"}
    )
    report_to: Any = field(default="none", metadata={"help": "none | tensorboard | wandb | ..."})
    resume_from_checkpoint: Any = field(
        default=None, metadata={"help": "checkpoint dir, or true = the latest in output_dir"}
    )
    training_args: dict = field(
        default_factory=dict, metadata={"help": "any other transformers TrainingArguments, passed through"}
    )
    # not a key: where the recipe came from (for relative paths and error messages)
    source: str | None = field(default=None, repr=False, metadata={"internal": True})

    # ------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    @property
    def base_dir(self) -> Path | None:
        return Path(self.source).resolve().parent if self.source else None

    def _err(self, key: str, value: Any, why: str) -> RecipeError:
        where = f" (recipe {self.source})" if self.source else ""
        return RecipeError(f"recipe key {key!r} = {value!r} is invalid{where}: {why}.")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and values of every key; normalise a few (floats from strings, comma lists)."""
        self._validate_model_and_data()
        self._validate_manager()
        self._validate_images()
        self._validate_train_parts()
        self._validate_lora()
        self._validate_text()
        self._validate_run()
        self._validate_training_args()

    def _validate_model_and_data(self) -> None:
        """The model, processor and data sources."""
        for key in (
            "model_name_or_path",
            "model_subfolder",
            "model_config",
            "processor",
            "image_folder",
            "data_path",
            "video_folder",
        ):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise self._err(key, value, "use a string (a path or a name) or null")
        if self.model_name_or_path is None and self.model_config is None:
            raise self._err("model_name_or_path", None, "set model_name_or_path (a checkpoint) or model_config")
        if self.model_name_or_path is not None and self.model_config is not None:
            raise self._err(
                "model_config", self.model_config, "set either model_name_or_path or model_config, not both"
            )
        if self.model_config is not None and self.processor is None:
            raise self._err("processor", None, "a model built from model_config needs a processor ('tiny' or a path)")
        if self.data_path is None:
            raise self._err("data_path", None, "set the training data (LLaVA JSON/JSONL, YAML mixture or synthetic:N)")

    def _validate_manager(self) -> None:
        """The `manager` mapping: known ManagerConfig fields and valid values."""
        if self.manager is not None:
            if not isinstance(self.manager, dict):
                raise self._err("manager", self.manager, "use a mapping of ManagerConfig fields, or null")
            known = [f.name for f in dataclasses.fields(ManagerConfig)]
            for name in self.manager:
                if name not in known:
                    raise self._err(f"manager.{name}", self.manager[name], f"unknown field{_suggest(name, known)}")
            try:
                ManagerConfig(**self.manager)
            except ManagerError as error:
                raise RecipeError(f"recipe key 'manager': {error}") from None

    def _validate_images(self) -> None:
        """The image layout keys."""
        if self.image_aspect_ratio is not None:
            value = self.image_aspect_ratio
            if value not in ("square", "anyres") and not _ANYRES_MAX.fullmatch(str(value)):
                raise self._err("image_aspect_ratio", value, "use 'square', 'anyres_max_N' (N >= 1) or 'anyres'")
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = self._parse_pinpoints(self.image_grid_pinpoints)

    def _validate_train_parts(self) -> None:
        """`train_parts` (normalised to a list) and a learning rate for each."""
        parts = self.train_parts
        if isinstance(parts, str):
            parts = [p.strip() for p in parts.split(",") if p.strip()]
        if not isinstance(parts, list) or not parts:
            raise self._err("train_parts", self.train_parts, f"use a non-empty list of {', '.join(PARTS)}")
        for part in parts:
            if part not in PARTS:
                raise self._err("train_parts", self.train_parts, f"unknown part {part!r}{_suggest(str(part), PARTS)}")
        if len(set(parts)) != len(parts):
            raise self._err("train_parts", self.train_parts, "a part is listed twice")
        if "manager" in parts and self.manager is None:
            raise self._err("train_parts", parts, "'manager' is trained but 'manager' is null (no Managers)")
        self.train_parts = parts

        if not isinstance(self.learning_rates, dict):
            raise self._err("learning_rates", self.learning_rates, "use a mapping part -> learning rate")
        for part, lr in list(self.learning_rates.items()):
            if part not in PARTS:
                raise self._err(f"learning_rates.{part}", lr, f"unknown part{_suggest(str(part), PARTS)}")
            self.learning_rates[part] = self._float(f"learning_rates.{part}", lr, minimum=0.0, strict=True)
        for part in self.train_parts:
            if part not in self.learning_rates:
                raise self._err(
                    f"learning_rates.{part}", None, f"part {part!r} is trained, so give it a learning rate"
                )

    def _validate_lora(self) -> None:
        """`lora` (defaults filled in)."""
        if self.lora is not None:
            if not isinstance(self.lora, dict):
                raise self._err("lora", self.lora, "use a mapping {r, alpha, dropout, target} or null")
            for name in self.lora:
                if name not in LORA_KEYS:
                    raise self._err(f"lora.{name}", self.lora[name], f"unknown field{_suggest(name, list(LORA_KEYS))}")
            lora = {"r": 64, "alpha": 16.0, "dropout": 0.05, "target": DEFAULT_LORA_TARGET, **self.lora}
            if isinstance(lora["r"], bool) or not isinstance(lora["r"], int) or lora["r"] < 1:
                raise self._err("lora.r", lora["r"], "use a positive integer rank")
            lora["alpha"] = self._float("lora.alpha", lora["alpha"], minimum=0.0)
            lora["dropout"] = self._float("lora.dropout", lora["dropout"], minimum=0.0)
            try:
                re.compile(lora["target"])
            except (re.error, TypeError) as error:
                raise self._err("lora.target", lora["target"], f"not a regular expression ({error})") from None
            if "language_model" not in self.train_parts:
                raise self._err(
                    "lora", self.lora, "LoRA trains the language model: add 'language_model' to train_parts"
                )
            self.lora = lora

    def _validate_text(self) -> None:
        """Tokenisation, conversation template and image checks."""
        self._int("model_max_length", minimum=8)
        self._choice("conv_template", CONV_TEMPLATES)
        if not isinstance(self.system_prompt, str):
            raise self._err("system_prompt", self.system_prompt, "use a string")
        self._choice("check_images", IMAGE_CHECKS)
        self._choice("on_bad_image", BAD_IMAGE_ACTIONS)
        self._int("frames_upbound", minimum=1)
        self._choice("check_videos", IMAGE_CHECKS)
        self._choice("on_bad_video", BAD_IMAGE_ACTIONS)
        self._bool("group_by_modality_length")

    def _validate_run(self) -> None:
        """The run: output, steps, batch, schedule, precision, DeepSpeed, saving."""
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise self._err("output_dir", self.output_dir, "use a directory path")
        self.num_train_epochs = self._float("num_train_epochs", self.num_train_epochs, minimum=0.0)
        self._int("max_steps", minimum=-1)
        if self.max_steps == 0:
            raise self._err("max_steps", 0, "use -1 (epochs) or a positive number of steps")
        self._int("per_device_train_batch_size", minimum=1)
        if self.gradient_accumulation_steps != "auto":
            self._int("gradient_accumulation_steps", minimum=1)
        if self.global_batch_size is not None:
            self._int("global_batch_size", minimum=1)
        elif self.gradient_accumulation_steps == "auto":
            raise self._err("gradient_accumulation_steps", "auto", "'auto' needs global_batch_size")
        if not isinstance(self.lr_scheduler_type, str):
            raise self._err("lr_scheduler_type", self.lr_scheduler_type, "use a scheduler name such as cosine")
        self.warmup_ratio = self._float("warmup_ratio", self.warmup_ratio, minimum=0.0)
        if self.warmup_ratio >= 1.0:
            raise self._err("warmup_ratio", self.warmup_ratio, "use a fraction of the steps in [0, 1)")
        self.max_grad_norm = self._float("max_grad_norm", self.max_grad_norm, minimum=0.0)
        self.weight_decay = self._float("weight_decay", self.weight_decay, minimum=0.0)
        self._bool("bf16")
        self._bool("gradient_checkpointing")
        self._bool("zero3_init")
        if self.deepspeed is not None and not isinstance(self.deepspeed, (str, dict)):
            raise self._err("deepspeed", self.deepspeed, "use a JSON path, a shipped name (zero2, zero3) or a mapping")
        self.deepspeed_config()  # the file exists, is JSON, has no optimizer block
        self._validate_fsdp()
        self._choice("fsdp_loading", FSDP_LOADINGS)
        if self.fsdp_loading == "sharded":
            if self.fsdp is None:
                raise self._err("fsdp_loading", "sharded", "it shards the model for FSDP2: set fsdp (e.g. fsdp2)")
            if self.model_name_or_path is None:
                raise self._err(
                    "fsdp_loading", "sharded", "it loads a checkpoint shard by shard: set model_name_or_path"
                )
        self._int("logging_steps", minimum=1)
        self._int("save_steps", minimum=0)
        if self.save_total_limit is not None:
            self._int("save_total_limit", minimum=1)
        self._int("seed", minimum=0)
        self._int("dataloader_num_workers", minimum=0)
        if self.cpu_threads is not None:
            self._int("cpu_threads", minimum=1)
        if not isinstance(self.report_to, (str, list)):
            raise self._err("report_to", self.report_to, "use a string or a list of strings")
        if self.resume_from_checkpoint is not None and not isinstance(self.resume_from_checkpoint, (str, bool)):
            raise self._err(
                "resume_from_checkpoint", self.resume_from_checkpoint, "use a checkpoint dir, true or null"
            )

    def _validate_fsdp(self) -> None:
        if self.fsdp is None:
            return
        if not isinstance(self.fsdp, (str, dict)):
            raise self._err("fsdp", self.fsdp, "use a JSON path, a shipped name (fsdp2, fsdp2_offload) or a mapping")
        config = self.fsdp_config()
        shown = self.fsdp if isinstance(self.fsdp, str) else "{...}"
        if self.deepspeed is not None:
            raise self._err("fsdp", shown, "a run uses DeepSpeed or FSDP, not both: set deepspeed: null")
        if int(config.get("version", 2)) != 2:
            raise self._err("fsdp", shown, 'only FSDP2 is supported: set "version": 2 (FSDP1 is deprecated)')
        if self.gradient_checkpointing and config.get("activation_checkpointing"):
            raise self._err(
                "gradient_checkpointing",
                True,
                "the FSDP config already checkpoints activations (activation_checkpointing); set "
                "gradient_checkpointing: false (both would recompute twice)",
            )

    def _validate_training_args(self) -> None:
        """`training_args`: TrainingArguments fields the recipe does not own."""
        if not isinstance(self.training_args, dict):
            raise self._err("training_args", self.training_args, "use a mapping of TrainingArguments fields")
        if self.training_args:
            from transformers import TrainingArguments

            allowed = {f.name for f in dataclasses.fields(TrainingArguments)}
            owned = set(self.keys()) | {
                "learning_rate",
                "output_dir",
                "deepspeed",
                "fsdp_config",
                "remove_unused_columns",
            }
            for name in self.training_args:
                if name not in allowed:
                    raise self._err(
                        f"training_args.{name}",
                        self.training_args[name],
                        f"not a TrainingArguments field{_suggest(name, sorted(allowed))}",
                    )
                if name in owned:
                    raise self._err(
                        f"training_args.{name}", self.training_args[name], "set it as a recipe key instead"
                    )

    def _parse_pinpoints(self, value: Any) -> list[list[int]] | str:
        if isinstance(value, str):  # '(1x1),...,(6x6)': grids in units of the crop size, expanded later
            if not _PINPOINT_RANGE.fullmatch(value.strip()):
                raise self._err("image_grid_pinpoints", value, "use [[h, w], ...] or a range like '(1x1),...,(6x6)'")
            try:
                expand_pinpoint_range(value, 1)
            except ConversionError as error:
                raise self._err("image_grid_pinpoints", value, str(error).split(": ", 1)[-1]) from None
            return value.strip()
        if (
            not isinstance(value, list)
            or not value
            or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
                for p in value
            )
        ):
            raise self._err("image_grid_pinpoints", value, "use a list of [height, width] pairs of positive integers")
        return [list(p) for p in value]

    def resolve_pinpoints(self, crop_size: int) -> list[list[int]] | None:
        """Pinpoints in pixels, [height, width]; the '(AxB),...,(CxD)' range reads as the original LLaVA-NeXT does
        (`expand_pinpoint_range`: A across, B down), so a recipe and a converted checkpoint agree."""
        value = self.image_grid_pinpoints
        if isinstance(value, str):
            return expand_pinpoint_range(value, crop_size)
        return value

    def _choice(self, key: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, key)
        if value not in choices:
            raise self._err(key, value, f"choose one of {', '.join(choices)}{_suggest(str(value), choices)}")

    def _bool(self, key: str) -> None:
        value = getattr(self, key)
        if not isinstance(value, bool):
            raise self._err(key, value, "use true or false")

    def _int(self, key: str, minimum: int | None = None) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._err(key, value, "use an integer")
        if minimum is not None and value < minimum:
            raise self._err(key, value, f"use an integer >= {minimum}")

    def _float(self, key: str, value: Any, minimum=None, maximum=None, strict=False) -> float:
        if isinstance(value, bool):
            raise self._err(key, value, "use a number")
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise self._err(key, value, "use a number") from None
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise self._err(key, value, "use a number")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise self._err(key, value, f"use a number {'>' if strict else '>='} {minimum}")
        if maximum is not None and value > maximum:
            raise self._err(key, value, f"use a number <= {maximum}")
        return float(value)

    # ---- paths -----------------------------------------------------------------------------------
    def path(self, key: str, must_exist: str | None = "file") -> Path:
        """The recipe path `key` resolved (cwd, then the recipe's dir); raises naming the key if missing."""
        value = getattr(self, key)
        candidates = [Path(value)]
        if self.base_dir is not None and not Path(value).is_absolute():
            candidates.append(self.base_dir / value)
        for candidate in candidates:
            if (must_exist == "file" and candidate.is_file()) or (must_exist == "dir" and candidate.is_dir()):
                return candidate.resolve()
        kind = "folder" if must_exist == "dir" else "file"
        tried = ", ".join(str(c) for c in candidates)
        raise self._err(key, value, f"no such {kind} (tried {tried})")

    def deepspeed_config(self) -> dict | None:
        """The DeepSpeed config as a dict (file loaded, `optimizer` block refused)."""
        if self.deepspeed is None:
            return None
        config = _load_deepspeed(self.deepspeed, self.base_dir, self.source)
        if "optimizer" in config:
            raise self._err("deepspeed", self.deepspeed if isinstance(self.deepspeed, str) else "{...}", _NO_OPTIMIZER)
        return config

    def fsdp_config(self) -> dict | None:
        """The FSDP2 config (`TrainingArguments.fsdp_config`) as a dict; None without FSDP."""
        if self.fsdp is None:
            return None
        return _load_json_config(self.fsdp, "fsdp", "fsdp2, fsdp2_offload", self.base_dir, self.source)

    def loads_sharded(self) -> bool:
        """True when transformers shards the model for FSDP2 while loading it (`fsdp_loading: sharded`)."""
        return self.fsdp is not None and self.fsdp_loading == "sharded"

    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage of the run; 0 without DeepSpeed."""
        config = self.deepspeed_config()
        return int(((config or {}).get("zero_optimization") or {}).get("stage", 0))

    def partitions_at_load(self) -> bool:
        """True when the model is loaded under `deepspeed.zero.Init` (a ZeRO-3 config and `zero3_init`)."""
        return bool(self.zero3_init) and self.zero_stage() == 3

    def model_config_path(self) -> Path:
        found = find_config(self.model_config, "models", (".json",), self.base_dir)
        if found is None:
            raise self._err("model_config", self.model_config, "no such file and not a shipped name (tiny)")
        return found


_NO_OPTIMIZER = (
    "remove the DeepSpeed 'optimizer' block: with one, the HF Trainer builds DeepSpeed's optimizer from it and "
    "silently drops the per-part learning rates"
)


def _load_deepspeed(value: str | dict, base_dir: Path | None, source: str | None) -> dict:
    return _load_json_config(value, "deepspeed", "zero2, zero3, zero3_offload", base_dir, source)


def _load_json_config(value: str | dict, key: str, names: str, base_dir: Path | None, source: str | None) -> dict:
    """A JSON config named by recipe key `key` (also its folder of shipped configs): a mapping, a path or a name."""
    if isinstance(value, dict):
        return dict(value)
    where = f" (recipe {source})" if source else ""
    found = find_config(value, key, (".json",), base_dir)
    if found is None:
        raise RecipeError(
            f"recipe key {key!r} = {value!r} is invalid{where}: no such file and not a shipped name ({names})."
        )
    try:
        config = json.loads(found.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(
            f"recipe key {key!r} = {value!r} is invalid{where}: {found} is not JSON ({error})."
        ) from None
    if not isinstance(config, dict):
        raise RecipeError(f"recipe key {key!r} = {value!r} is invalid{where}: {found} holds no JSON object.")
    return config


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- loading -------------------------------------------------------------------------------------
def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--a', '1', '--b.c=x', '--flag']` -> `{'a': 1, 'b.c': 'x', 'flag': True}` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(f"unexpected argument {arg!r}: overrides look like --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_") if key in ("local-rank",) else key
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        overrides[key] = _yaml_value(value)
        i += 1
    overrides.pop("local_rank", None)  # appended by the `deepspeed` launcher; LOCAL_RANK is in the environment
    return overrides


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


#: a recipe may start from another and change a few keys: `base: stage2_si` (a shipped name, or a path relative to
#: the recipe's folder); its mappings (`manager`, `learning_rates`, `lora`, `training_args`) merge key by key
BASE_KEY = "base"
_MERGED_MAPPINGS = ("manager", "learning_rates", "lora", "training_args")
_RECIPE_KINDS = ("recipes", "ablations")  # where shipped recipe names are looked up, in this order


def find_recipe(path_or_name: str, base_dir: Path | None = None) -> Path | None:
    """A recipe file: a path (cwd, then `base_dir`), a shipped recipe, or a shipped ablation (`configs/ablations/`)."""
    for kind in _RECIPE_KINDS:
        found = find_config(path_or_name, kind, (".yaml", ".yml"), base_dir)
        if found is not None:
            return found
    return None


def _shipped_recipe_list() -> str:
    return f"{', '.join(shipped_names('recipes'))}; ablations: {', '.join(shipped_names('ablations'))}"


def read_recipe_file(path_or_name: str, base_dir: Path | None = None, _chain: tuple[Path, ...] = ()):
    """`(data, path)` of a recipe file, with its `base` chain merged in (the file's own keys win)."""
    found = find_recipe(path_or_name, base_dir)
    if found is None:
        where = f" (the base of {_chain[-1]})" if _chain else ""
        raise RecipeError(
            f"recipe {path_or_name!r}{where}: no such file and not a shipped recipe ({_shipped_recipe_list()})"
        )
    if found in _chain:
        raise RecipeError(f"recipe {found}: its 'base' chain comes back to itself ({' -> '.join(map(str, _chain))})")
    try:
        data = yaml.safe_load(found.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {found}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {found}: the top level must be a mapping of keys")
    keys = Recipe.keys()
    for key in data:
        if key not in keys and key != BASE_KEY:
            raise RecipeError(f"recipe {found}: unknown key {key!r}{_suggest(str(key), keys)}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data, found
    if not isinstance(base, str):
        raise RecipeError(f"recipe {found}: 'base' must be a recipe name or path, got {base!r}")
    base_data, _ = read_recipe_file(base, found.parent, (*_chain, found))
    return merge_recipe_data(base_data, data), found


def merge_recipe_data(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied: mappings merge key by key, anything else (also `null`) replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if key in _MERGED_MAPPINGS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    keys = Recipe.keys()
    nested = {"manager", "learning_rates", "lora", "training_args", "deepspeed", "fsdp"}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if head not in keys:
            raise RecipeError(f"unknown recipe key {key!r} on the command line{_suggest(head, keys)}")
        if dot:
            if head not in nested:
                raise RecipeError(f"recipe key {head!r} has no sub-keys (got --{key})")
            current = data.get(head)
            if head in ("deepspeed", "fsdp") and isinstance(current, str):
                base_dir = Path(source).resolve().parent if source else None
                names = "zero2, zero3, zero3_offload" if head == "deepspeed" else "fsdp2, fsdp2_offload"
                current = _load_json_config(current, head, names, base_dir, source)
            current = dict(current or {})
            target = current
            parts = rest.split(".")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise RecipeError(f"recipe key {key!r}: {part!r} is not a mapping")
            target[parts[-1]] = value
            data[head] = current
        else:
            data[key] = value
    return data


def load_recipe(path_or_name: str, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read a recipe YAML (path or shipped name), apply overrides, validate; raises `RecipeError`."""
    data, found = read_recipe_file(path_or_name)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = apply_overrides(data, overrides or {}, str(found))
    return Recipe(**data, source=str(found))


def recipe_from_dict(data: dict[str, Any], source: str | None = None) -> Recipe:
    """A `Recipe` from a mapping (tests, notebooks); unknown keys raise."""
    keys = Recipe.keys()
    for key in data:
        if key not in keys:
            raise RecipeError(f"unknown recipe key {key!r}{_suggest(str(key), keys)}")
    return Recipe(**data, source=source)


def world_size_from_env() -> int:
    """The number of processes the launcher started (torchrun, deepspeed and accelerate all set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_accumulation(recipe: Recipe, world_size: int) -> int:
    """Gradient accumulation steps so that per_device x accumulation x world_size == global_batch_size."""
    per_step = recipe.per_device_train_batch_size * world_size
    if recipe.gradient_accumulation_steps == "auto":
        if recipe.global_batch_size % per_step:
            raise RecipeError(
                f"recipe key 'global_batch_size' = {recipe.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size x world size = {recipe.per_device_train_batch_size} x {world_size}"
            )
        return recipe.global_batch_size // per_step
    accumulation = recipe.gradient_accumulation_steps
    if recipe.global_batch_size is not None and per_step * accumulation != recipe.global_batch_size:
        raise RecipeError(
            f"recipe key 'global_batch_size' = {recipe.global_batch_size} but per_device_train_batch_size x "
            f"gradient_accumulation_steps x world size = {recipe.per_device_train_batch_size} x {accumulation} x "
            f"{world_size} = {per_step * accumulation}; set gradient_accumulation_steps: auto or fix one of them"
        )
    return accumulation
