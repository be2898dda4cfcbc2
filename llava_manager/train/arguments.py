"""A recipe as HF `TrainingArguments` (creating them starts the process group and DeepSpeed)."""

from __future__ import annotations

from .recipe import Recipe, RecipeError


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
        "fsdp": recipe.fsdp is not None and not recipe.loads_sharded(),
        "fsdp_config": None if recipe.loads_sharded() else recipe.fsdp_config(),
        "logging_steps": recipe.logging_steps,
        "save_strategy": "steps" if recipe.save_steps > 0 else "no",
        "save_steps": recipe.save_steps if recipe.save_steps > 0 else 500,
        "save_total_limit": recipe.save_total_limit,
        "seed": recipe.seed,
        "dataloader_num_workers": recipe.dataloader_num_workers,
        "report_to": recipe.report_to,
        "remove_unused_columns": False,
    }
    if recipe.loads_sharded():
        # transformers shards the model while loading it and owns its FSDP2 units; the Trainer does not wrap it again,
        # checkpoints only the model (it cannot save a sharded-at-load optimizer), and activation checkpointing is
        # transformers' own (the FSDP config's activation_checkpointing asks for it)
        kwargs["save_only_model"] = True
        if (recipe.fsdp_config() or {}).get("activation_checkpointing"):
            kwargs["gradient_checkpointing"] = True
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
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
