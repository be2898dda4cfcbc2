"""`python -m llava_manager.train [RECIPE] [--key value ...]` (also `llava-manager train`): the order of work
and the command line. Each step lives in its own module: `environment`, `model_setup`, `arguments`, `saving`.

Launch it as it is with `deepspeed`, `torchrun` or `accelerate launch`. The order of work is:

1. read and validate the recipe and the data (every sample, every image file), load the model and
   the processor, check they are LLaVA-OV and agree: all errors come here, before any process group
   (under ZeRO-3 the model is loaded partitioned, `deepspeed.zero.Init`, after the process group starts);
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
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ManagerError
from . import host_memory
from .arguments import training_arguments
from .environment import prepare_environment
from .model_setup import (
    apply_lora,
    check_processor,
    check_video_support,
    configure_images,
    distributed_config_class,
    load_for_training,
    patch_model,
)
from .recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    parse_overrides,
    resolve_accumulation,
    shipped_names,
    world_size_from_env,
)
from .resume import choose_checkpoint
from .saving import gather_dropped, remove_what_a_failed_run_created, save_lora_result

logger = logging.getLogger("llava_manager.train")

USAGE = """usage: python -m llava_manager.train [RECIPE] [--key value ...] [--print-recipe]

RECIPE is a YAML file or a shipped recipe name ({names}; default tiny_cpu),
or one of the paper's ablations in configs/ablations/ ({ablations}).
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


# ---- data ----------------------------------------------------------------------------------------
def prepare_data(recipe: Recipe):
    from ..testing.synthetic import write_shapes_dataset
    from .data import load_samples

    if recipe.data_path.startswith("synthetic:"):
        try:
            count = int(recipe.data_path.split(":", 1)[1])
        except ValueError:
            raise RecipeError(
                f"recipe key 'data_path' = {recipe.data_path!r}: use synthetic:N with a sample count"
            ) from None
        folder = Path(recipe.output_dir) / "synthetic_data"
        data_path = write_shapes_dataset(folder, count, seed=recipe.seed)
        image_folder, video_folder = folder / "images", folder / "videos"
    else:
        data_path = recipe.path("data_path", "file")
        image_folder = recipe.path("image_folder", "dir") if recipe.image_folder is not None else None
        video_folder = recipe.path("video_folder", "dir") if recipe.video_folder is not None else None
    return load_samples(
        data_path,
        image_folder,
        check_images=recipe.check_images,
        on_bad_image=recipe.on_bad_image,
        seed=recipe.seed,
        video_folder=video_folder,
        check_videos=recipe.check_videos,
        on_bad_video=recipe.on_bad_video,
        video_frames=recipe.frames_upbound,
    )


# ---- the run -----------------------------------------------------------------------------------------
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
    prepare_environment(
        uses_deepspeed=deepspeed_config is not None, cpu_threads=recipe.cpu_threads, uses_fsdp=recipe.fsdp is not None
    )
    accumulation = resolve_accumulation(recipe, world_size_from_env())
    if recipe.zero_stage() == 3 or recipe.fsdp is not None:  # whole modules gathered and freed: see host_memory
        host_memory.return_freed_tensors()

    # 1. everything that can be wrong, checked before any process group starts (but the model under ZeRO-3 with
    #    zero3_init: transformers loads it under deepspeed.zero.Init, which needs the DeepSpeed config and the
    #    process group first; a bad model then fails on every rank alike)
    data = prepare_data(recipe)
    args = None
    if recipe.partitions_at_load():
        args = training_arguments(recipe, accumulation, deepspeed_config)  # keeps transformers' HfDeepSpeedConfig
        _start_deepspeed_comm(args)
    elif recipe.loads_sharded():  # transformers shards the model while loading it: the process group comes first
        distributed_config_class()  # refuses a transformers that cannot, before the group starts
        args = training_arguments(recipe, accumulation, deepspeed_config)
        args.device  # noqa: B018  (a cached property: starts accelerate's state and torch.distributed)
    model, processor = load_for_training(recipe)
    processor, layout = configure_images(recipe, model, processor)
    model = patch_model(recipe, model, layout, processor.tokenizer)
    check_processor(model, processor)
    processor.tokenizer.model_max_length = recipe.model_max_length

    from .collator import ManagerDataCollator, make_dummy_image, make_dummy_video
    from .data import ConversationEncoder, SupervisedDataset
    from .trainer import ManagerTrainer, set_trainable

    video_token_id = getattr(model.config, "video_token_id", None)
    encoder = ConversationEncoder(
        processor,
        model.config.image_token_id,
        recipe.conv_template,
        recipe.system_prompt,
        recipe.model_max_length,
        video_token_id=video_token_id,
        video_frames=recipe.frames_upbound,
    )
    dataset = SupervisedDataset(
        data.samples, encoder, on_bad_image=recipe.on_bad_image, on_bad_video=recipe.on_bad_video
    )
    if dataset.has_videos:
        check_video_support(model, processor)
    collator = ManagerDataCollator(
        processor.tokenizer.pad_token_id,
        model.config.image_token_id,
        dummy_image=make_dummy_image(encoder),
        video_token_id=video_token_id,
        dummy_video=make_dummy_video(encoder) if dataset.has_videos else None,
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
    if args is None:
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
    """Run one training job described by `recipe` and return its result (the trainer included).

    A run that fails removes what it created in `output_dir` (the folder itself if it made it), except the
    checkpoints it saved, which a resume can use; what was there before is never touched."""
    with remove_what_a_failed_run_created(Path(recipe.output_dir)):
        return _train(recipe, callbacks)


def _train(recipe: Recipe, callbacks: list | None) -> TrainResult:
    resume = choose_checkpoint(recipe.output_dir, recipe.resume_from_checkpoint)  # before any heavy work
    trainer, prepared = build_trainer(recipe, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)

    # 3. the final directory
    output_dir = Path(recipe.output_dir)
    if prepared.lora_config is None:
        trainer.save_model(str(output_dir))
    else:
        save_lora_result(trainer, prepared.lora_config, prepared.processor, output_dir)
    trainer.save_state()
    dropped = gather_dropped(trainer, prepared.skipped)
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        _save_managers_beside(recipe, output_dir)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (output_dir / "dropped_samples.json").write_text(json.dumps(dropped, indent=1))
        total = len(dropped["skipped_before_training"]) + len(dropped["dropped_in_training"])
        if total:
            logger.warning("%d sample(s) were not trained on; see %s", total, output_dir / "dropped_samples.json")
    return TrainResult(output_dir, trainer.state.log_history, dropped["dropped_in_training"], trainer)


def _start_deepspeed_comm(args) -> None:
    """Start the process group now (accelerate, through `args.device`) and DeepSpeed's communication on top of it:
    zero.Init reads the world size from `deepspeed.comm`, which otherwise starts only in `deepspeed.initialize` (and
    says 1 until then: DeepSpeed's batch-size check fails on every rank)."""
    import deepspeed
    import torch.distributed as dist

    args.device  # noqa: B018  (a cached property: sets up accelerate's state and torch.distributed)
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _save_managers_beside(recipe: Recipe, output_dir: Path) -> None:
    """`output_dir/managers`: the Managers alone (and the projector / newline when trained), PEFT-style."""
    from ..checkpoint.managers_only import save_managers_from_checkpoint

    saved_config = json.loads((output_dir / "config.json").read_text())
    if saved_config.get("manager") is None:  # trained without Managers
        return
    trained = list(recipe.train_parts) + (["lora"] if recipe.lora is not None else [])
    save_managers_from_checkpoint(
        output_dir,
        output_dir / "managers",
        include=("projector", "image_newline") if "projector" in recipe.train_parts else (),
        base_name=recipe.model_name_or_path or "",
        trained_parts=trained,
        overwrite=True,
    )


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
        print(USAGE.format(names=", ".join(shipped_names("recipes")), ablations=", ".join(shipped_names("ablations"))))
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
    end_process_group()
    return 0


def end_process_group() -> None:
    """Close torch.distributed after a finished run: a gloo group left to interpreter shutdown can abort a rank
    ("terminate called without an active exception") after everything was saved, and the launcher then reports the
    run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has finished writing
        dist.destroy_process_group()
