"""`python -m llava_manager.train [RECIPE] [--key value ...]` (also `llava-manager train`).

Launch it as it is with `deepspeed`, `torchrun` or `accelerate launch`. The order of work is:

1. read and validate the recipe and the data (every sample, every image file), load the model and
   the processor, check they are LLaVA-OV and agree: all errors come here, before any process group;
2. patch the model with the recipe's Managers (unless it is already patched), freeze / LoRA;
3. `TrainingArguments` (this starts the process group, and DeepSpeed from the recipe's JSON), then the
   HF Trainer (`ManagerTrainer`) trains, resuming if asked;
4. the final HF-format directory: weights (gathered under ZeRO-3), config, processor, the recipe,
   and `dropped_samples.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ManagerError
from .recipe import Recipe, RecipeError, load_recipe, parse_overrides, resolve_accumulation, world_size_from_env

logger = logging.getLogger("llava_manager.train")

USAGE = """usage: python -m llava_manager.train [RECIPE] [--key value ...] [--print-recipe]

RECIPE is a YAML file or a shipped recipe name (stage1, stage1_5, stage2_si, tiny_cpu; default tiny_cpu).
Every recipe key can be overridden: --max_steps 10, --learning_rates.manager 5e-5, --manager.grid base,
--deepspeed zero3, --train_parts manager,projector. Values are read as YAML.

launchers:
  deepspeed --num_gpus 8 --module llava_manager.train stage2_si --model_name_or_path ...
  torchrun --nproc_per_node 8 -m llava_manager.train stage2_si ...
  accelerate launch --num_processes 8 -m llava_manager.train stage2_si ...
"""


@dataclass
class TrainResult:
    output_dir: Path
    log_history: list[dict[str, Any]]
    dropped_samples: list[str]
    trainer: Any = field(default=None, repr=False)

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.log_history if "loss" in entry]


# `accelerate launch --use_deepspeed` sets this for the whole process; remember whether a launcher did
_LAUNCHER_USES_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED")


# ---- environment -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment(uses_deepspeed: bool, cpu_threads: int | None = None) -> None:
    """CPU-only DeepSpeed fixes, and a one-process "distributed" environment when no launcher set one."""
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if cpu_threads is not None:  # tiny models on shared cores: more threads only wait for each other
            torch.set_num_threads(cpu_threads)
    if uses_deepspeed:
        if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
            )
        if not torch.cuda.is_available():
            import deepspeed.ops

            # the shm comm op is JIT-compiled C++ (minutes) and only speeds up CPU all-reduce
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a previous run's ZeRO-3 config would zero.Init the model we build now
    # a previous run in this process leaves accelerate's singletons behind (e.g. "this is a DeepSpeed run");
    # start from scratch so each recipe gets exactly its own setup (an existing process group is reused)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if _LAUNCHER_USES_DEEPSPEED is None:  # accelerate's Accelerator sets it for good once DeepSpeed was used
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


# ---- model and processor -----------------------------------------------------------------------------
def _llava_classes():
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def load_model_and_processor(recipe: Recipe):
    """The model (on CPU) and its processor, per the recipe; raises `RecipeError` for non-LLaVA-OV models.

    Checkpoints load in bf16 for DeepSpeed bf16 runs (DeepSpeed keeps fp32 master weights), else in fp32."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    import llava_manager  # noqa: F401  (registers the llava_onevision_manager model type)

    llava_cls = _llava_classes()
    dtype = torch.bfloat16 if recipe.bf16 and recipe.deepspeed is not None else torch.float32
    if recipe.model_config is not None:
        path = recipe.model_config_path()
        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as error:  # noqa: BLE001  (any failure: report it against the recipe key)
            raise RecipeError(
                f"recipe key 'model_config' = {recipe.model_config!r}: cannot read {path} ({error})"
            ) from None
        if config.model_type not in ("llava_onevision", "llava_onevision_manager"):
            raise RecipeError(
                f"recipe key 'model_config' = {recipe.model_config!r}: {path} is a {config.model_type!r} config, "
                "not LLaVA-OneVision (llava_onevision)"
            )
        transformers.set_seed(recipe.seed)
        model = AutoModelForImageTextToText.from_config(config)
        model.name_or_path = ""  # a random model: not the config file (PEFT would look for weights there)
        processor = _processor_for(recipe, config)
    else:
        from llava_manager import from_pretrained as load

        try:
            model, processor = load(recipe.model_name_or_path, subfolder=recipe.model_subfolder, dtype=dtype)
        except ManagerError as error:
            raise RecipeError(f"recipe key 'model_name_or_path' = {recipe.model_name_or_path!r}: {error}") from None
        if recipe.processor is not None:
            processor = _processor_for(recipe, model.config)
    if not isinstance(model, llava_cls):
        raise RecipeError(
            f"recipe key 'model_name_or_path' = {recipe.model_name_or_path!r} loads a {type(model).__name__}, "
            "not a LLaVA-OneVision model (LlavaOnevisionForConditionalGeneration)"
        )
    return model, processor


def _processor_for(recipe: Recipe, config):
    if recipe.processor == "tiny":
        from llava_manager.testing.tiny import tiny_processor

        return tiny_processor(config)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(recipe.processor)
    except Exception as error:  # noqa: BLE001  (any failure: report it against the recipe key)
        raise RecipeError(f"recipe key 'processor' = {recipe.processor!r}: cannot load it ({error})") from None


def configure_images(recipe: Recipe, model, processor):
    """Apply `image_aspect_ratio` / `image_grid_pinpoints` to model and processor; returns (processor, layout)."""
    from llava_manager import ImageLayout, is_patched

    config = model.config
    layout = ImageLayout.from_dict(getattr(config, "image_layout", None)) if is_patched(model) else ImageLayout()
    if recipe.image_aspect_ratio is not None:
        mode = "square" if recipe.image_aspect_ratio == "square" else "anyres"
        if mode != layout.mode and is_patched(model):
            raise RecipeError(
                f"recipe key 'image_aspect_ratio' = {recipe.image_aspect_ratio!r} but the model is already patched "
                f"with the {layout.mode!r} image layout"
            )
        layout = dataclasses.replace(layout, mode=mode)
        if mode == "anyres":
            config.vision_aspect_ratio = recipe.image_aspect_ratio
            processor.vision_aspect_ratio = recipe.image_aspect_ratio
    pinpoints = recipe.resolve_pinpoints(config.vision_config.image_size)
    if pinpoints is not None:
        config.image_grid_pinpoints = [list(p) for p in pinpoints]
        processor.image_processor.image_grid_pinpoints = [list(p) for p in pinpoints]
    processor_mode = (getattr(processor, "image_layout", None) or {}).get("mode", "anyres")
    if layout.mode == "square" and processor_mode != "square":
        processor = _square_processor(processor)
    elif layout.mode != processor_mode:
        raise RecipeError(
            f"the processor counts image tokens for a {processor_mode!r} layout but the model uses {layout.mode!r}; "
            "use the model's own processor (recipe key 'processor')"
        )
    return processor, layout


def _square_processor(processor):
    """llava-manager's processor in square mode (one crop per image, no newline), from an HF LLaVA-OV one."""
    from llava_manager.processor import LlavaOnevisionManagerImageProcessor, LlavaOnevisionManagerProcessor

    source = processor.image_processor
    image_processor = LlavaOnevisionManagerImageProcessor(
        size=dict(source.size),
        image_mean=list(source.image_mean),
        image_std=list(source.image_std),
        image_grid_pinpoints=[list(p) for p in source.image_grid_pinpoints],
        crop_mode="square",
    )
    return LlavaOnevisionManagerProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        video_processor=getattr(processor, "video_processor", None),
        num_image_tokens=processor.num_image_tokens,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        vision_aspect_ratio=processor.vision_aspect_ratio,
        image_layout={"mode": "square"},
    )


def patch_model(recipe: Recipe, model, layout):
    """Patch with the recipe's Managers unless the model is patched already (then the recipe must agree)."""
    from llava_manager import ImageLayout, ManagerConfig, is_patched, patch_llava

    if is_patched(model):
        current = getattr(model.config, "manager", None)
        if recipe.manager is not None and current is not None:
            wanted = ManagerConfig(**recipe.manager).resolve(model.config).to_dict()
            differs = {
                k: (current.get(k), v)
                for k, v in wanted.items()
                if recipe.manager.get(k) is not None and current.get(k) != v
            }
            if differs:
                logger.warning(
                    "the model is already patched; keeping its Managers (recipe 'manager' differs: %s)", differs
                )
        if recipe.manager is not None and current is None:
            raise RecipeError("recipe key 'manager' asks for Managers but the model is patched without any")
        return model
    if recipe.manager is None and layout == ImageLayout():
        return model
    if recipe.manager is None:  # no Managers, but a non-default image layout
        return patch_llava(model, layout=layout, managers=False)
    try:
        return patch_llava(model, ManagerConfig(**recipe.manager), layout=layout)
    except ManagerError as error:
        raise RecipeError(f"recipe key 'manager': {error}") from None


def check_processor(model, processor) -> None:
    image_id = model.config.image_token_id
    if processor.image_token_id != image_id:
        raise RecipeError(
            f"the processor's image token id {processor.image_token_id} differs from the model's {image_id}; "
            "use the model's own processor (recipe key 'processor')"
        )
    if processor.tokenizer.pad_token_id is None:
        raise RecipeError("the processor's tokenizer has no pad token")


def apply_lora(recipe: Recipe, model):
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target"],
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config), config
    except ValueError as error:
        raise RecipeError(f"recipe key 'lora.target' = {lora['target']!r}: {error}") from None


# ---- data ----------------------------------------------------------------------------------------
def prepare_data(recipe: Recipe):
    from .data import load_samples
    from ..testing.synthetic import write_shapes_dataset

    if recipe.data_path.startswith("synthetic:"):
        try:
            count = int(recipe.data_path.split(":", 1)[1])
        except ValueError:
            raise RecipeError(
                f"recipe key 'data_path' = {recipe.data_path!r}: use synthetic:N with a sample count"
            ) from None
        folder = Path(recipe.output_dir) / "synthetic_data"
        data_path = write_shapes_dataset(folder, count, seed=recipe.seed)
        image_folder = folder / "images"
    else:
        data_path = recipe.path("data_path", "file")
        image_folder = recipe.path("image_folder", "dir") if recipe.image_folder is not None else None
    return load_samples(
        data_path, image_folder, check_images=recipe.check_images, on_bad_image=recipe.on_bad_image, seed=recipe.seed
    )


# ---- the run -----------------------------------------------------------------------------------------
def training_arguments(recipe: Recipe, accumulation: int, deepspeed_config: dict | None):
    from transformers import TrainingArguments

    lrs = [recipe.learning_rates[p] for p in recipe.train_parts]
    kwargs = {
        "output_dir": recipe.output_dir,
        "learning_rate": max(lrs),  # logged only: each param group carries its part's rate
        "weight_decay": recipe.weight_decay,
        "num_train_epochs": recipe.num_train_epochs,
        "max_steps": recipe.max_steps,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "lr_scheduler_type": recipe.lr_scheduler_type,
        "warmup_steps": recipe.warmup_ratio,  # a float in [0, 1) is a ratio of the steps
        "max_grad_norm": recipe.max_grad_norm,
        "bf16": recipe.bf16,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if recipe.gradient_checkpointing else None,
        "deepspeed": deepspeed_config,
        "logging_steps": recipe.logging_steps,
        "save_strategy": "steps" if recipe.save_steps > 0 else "no",
        "save_steps": recipe.save_steps if recipe.save_steps > 0 else 500,
        "save_total_limit": recipe.save_total_limit,
        "seed": recipe.seed,
        "dataloader_num_workers": recipe.dataloader_num_workers,
        "report_to": recipe.report_to,
        "remove_unused_columns": False,
    }
    import torch

    if not torch.cuda.is_available():
        # accelerate only counts the processes of a CPU-only launch (torchrun, deepspeed) as distributed with
        # use_cpu; without it each rank thinks it is alone and DeepSpeed's batch-size check fails
        kwargs["use_cpu"] = True
        kwargs["dataloader_pin_memory"] = False
    kwargs.update(recipe.training_args)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"the recipe gives invalid TrainingArguments: {error}") from None


@dataclass
class Prepared:
    """What `build_trainer` made besides the trainer (needed to finish the run)."""

    processor: Any
    lora_config: Any
    skipped: list[str]


def build_trainer(recipe: Recipe, *, callbacks: list | None = None):
    """Check everything, build model / data / `ManagerTrainer`; returns `(trainer, Prepared)`.

    All input errors are raised before `TrainingArguments`, which starts the process group."""
    deepspeed_config = recipe.deepspeed_config()
    prepare_environment(uses_deepspeed=deepspeed_config is not None, cpu_threads=recipe.cpu_threads)
    accumulation = resolve_accumulation(recipe, world_size_from_env())

    # 1. everything that can be wrong, checked before any process group starts
    data = prepare_data(recipe)
    model, processor = load_model_and_processor(recipe)
    processor, layout = configure_images(recipe, model, processor)
    model = patch_model(recipe, model, layout)
    check_processor(model, processor)
    processor.tokenizer.model_max_length = recipe.model_max_length

    from .collator import ManagerDataCollator, make_dummy_image
    from .data import ConversationEncoder, SupervisedDataset
    from .trainer import ManagerTrainer, set_trainable

    encoder = ConversationEncoder(
        processor, model.config.image_token_id, recipe.conv_template, recipe.system_prompt, recipe.model_max_length
    )
    dataset = SupervisedDataset(data.samples, encoder, on_bad_image=recipe.on_bad_image)
    collator = ManagerDataCollator(
        processor.tokenizer.pad_token_id, model.config.image_token_id, dummy_image=make_dummy_image(encoder)
    )
    if "manager" in recipe.train_parts and getattr(model.model, "manager", None) is None:
        raise RecipeError("recipe key 'train_parts' lists 'manager' but the model has no Managers")
    set_trainable(model, recipe.train_parts)
    lora_config = None
    if recipe.lora is not None:
        model, lora_config = apply_lora(recipe, model)
        set_trainable(model, recipe.train_parts, lora=True)
    if recipe.gradient_checkpointing:
        model.config.use_cache = False

    # 2. the process group starts here (TrainingArguments sets up DeepSpeed / torch.distributed)
    args = training_arguments(recipe, accumulation, deepspeed_config)
    trainer = ManagerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        learning_rates=recipe.learning_rates,
        group_by_modality_length=recipe.group_by_modality_length,
        lora=recipe.lora is not None,
    )
    return trainer, Prepared(processor=processor, lora_config=lora_config, skipped=data.skipped)


def train(recipe: Recipe, *, callbacks: list | None = None) -> TrainResult:
    """Run one training job described by `recipe` and return its result (the trainer included)."""
    trainer, prepared = build_trainer(recipe, callbacks=callbacks)
    resume = recipe.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=None if resume is False else resume)

    # 3. the final directory
    output_dir = Path(recipe.output_dir)
    if prepared.lora_config is None:
        trainer.save_model(str(output_dir))
    else:
        save_lora_result(trainer, prepared.lora_config, prepared.processor, output_dir)
    trainer.save_state()
    dropped = _gather_dropped(trainer, prepared.skipped)
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (output_dir / "dropped_samples.json").write_text(json.dumps(dropped, indent=1))
        total = len(dropped["skipped_before_training"]) + len(dropped["dropped_in_training"])
        if total:
            logger.warning("%d sample(s) were not trained on; see %s", total, output_dir / "dropped_samples.json")
    return TrainResult(output_dir, trainer.state.log_history, dropped["dropped_in_training"], trainer)


def _gather_dropped(trainer, skipped: list[str]) -> dict[str, list[str]]:
    import torch.distributed as dist

    mine = sorted(trainer.dropped_samples)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        mine = sorted({d for part in gathered for d in part})
    return {"skipped_before_training": list(skipped), "dropped_in_training": mine}


def save_lora_result(trainer, lora_config, processor, output_dir: Path) -> None:
    """LoRA runs: the adapter (plus the fully trained parts) in `output_dir/adapter`, and the merged model
    (LoRA folded into the LLM) as the HF-format `output_dir`. Works under ZeRO-3: weights are gathered first."""
    import torch
    from peft import get_peft_model

    from ..attach import unwrap
    from .trainer import save_non_lora_trainables

    trainer.save_model(str(output_dir / "adapter"))  # PEFT adapter, gathered under ZeRO-3
    wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(wrapped)  # full tensors on the main process (collective)
    if not trainer.args.should_save:
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # build the merge copy unpartitioned
    base = unwrap(trainer.model)
    dtype = next(iter(state.values())).dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else default)
    try:
        fresh = type(base)(base.config)
    finally:
        torch.set_default_dtype(default)
    peft_copy = get_peft_model(fresh, lora_config)
    missing, unexpected = peft_copy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"merging LoRA: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_trainable_names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, param in peft_copy.named_parameters():
        param.requires_grad_(name in set_trainable_names)
    save_non_lora_trainables(peft_copy, str(output_dir / "adapter"))
    merged = peft_copy.merge_and_unload()
    merged.save_pretrained(str(output_dir))
    processor.save_pretrained(str(output_dir))


# ---- command line --------------------------------------------------------------------------------------
def split_argv(argv: list[str]) -> tuple[str, list[str], bool]:
    """(recipe, overrides, print_only) from `[RECIPE] [--key value ...] [--print-recipe]`.

    The `deepspeed` launcher puts `--local_rank=N` first; it is dropped (LOCAL_RANK is in the environment)."""
    rest: list[str] = []
    skip_next = False
    for k, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.split("=")[0] in ("--local_rank", "--local-rank"):
            skip_next = "=" not in arg and k + 1 < len(argv) and not argv[k + 1].startswith("--")
            continue
        rest.append(arg)
    print_only = "--print-recipe" in rest
    rest = [a for a in rest if a != "--print-recipe"]
    recipe = "tiny_cpu"
    if rest and not rest[0].startswith("--"):
        recipe = rest.pop(0)
    return recipe, rest, print_only


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("recipe keys:")
        for f in dataclasses.fields(Recipe):
            if not f.metadata.get("internal"):
                print(f"  {f.name:30s} {f.metadata.get('help', '')}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch.distributed functions that torch deprecates, once per module and step
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    recipe_name, overrides, print_only = split_argv(argv)
    try:
        recipe = load_recipe(recipe_name, parse_overrides(overrides))
        if print_only:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        result = train(recipe)
    except ManagerError as error:  # RecipeError, DataError, ...: one clear message, no traceback
        print(f"llava_manager.train: error: {error}", file=sys.stderr)
        return 2
    if result.trainer is not None and result.trainer.args.should_save:
        print(f"llava_manager.train: done; model in {result.output_dir}")
    return 0
