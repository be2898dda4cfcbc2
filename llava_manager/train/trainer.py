"""`ManagerTrainer`: the HF Trainer with one optimizer param group per trained part.

Parts are found by structure on the (PEFT-unwrapped) LLaVA-OV model, never by name:

| part | modules |
|---|---|
| `manager` | `model.model.manager` (every Manager and the layer embedding) |
| `projector` | `model.model.multi_modal_projector` and `model.model.image_newline` |
| `vision_tower` | `model.model.vision_tower` |
| `language_model` | everything else: the LLM, `lm_head`, LoRA weights |

Each part gets two groups (with and without weight decay, biases and norms without, as the HF
Trainer does), named `"<part>"` and `"<part>.no_decay"`, each carrying the recipe's learning rate
for the part. Frozen parameters are in no group. The DeepSpeed JSONs have no `optimizer` block, so
DeepSpeed wraps this optimizer as it is (with one, the HF Trainer would build DeepSpeed's optimizer
from the config and the per-part learning rates would be lost).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..attach import unwrap
from .recipe import PARTS

NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"


def part_modules(model: nn.Module) -> dict[str, list[Any]]:
    """{part: [modules or bare parameters]} on the LLaVA-OV inside `model` (the language model: the rest)."""
    llava = unwrap(model).model
    manager = getattr(llava, "manager", None)
    return {
        "manager": [manager] if isinstance(manager, nn.Module) else [],
        "projector": [llava.multi_modal_projector, llava.image_newline],
        "vision_tower": [llava.vision_tower],
    }


def parameter_parts(model: nn.Module) -> dict[int, str]:
    """{id(parameter): part} for every parameter of `model` (wrappers and LoRA layers included)."""
    owner: dict[int, str] = {}
    for part, members in part_modules(model).items():
        for member in members:
            params = [member] if isinstance(member, nn.Parameter) else list(member.parameters())
            for param in params:
                owner[id(param)] = part
    return {id(p): owner.get(id(p), "language_model") for p in model.parameters()}


def set_trainable(model: nn.Module, train_parts: list[str], lora: bool = False) -> dict[str, int]:
    """Freeze everything but `train_parts` (with LoRA the language model trains only its LoRA weights).

    Returns {part: trainable parameter count}."""
    parts = parameter_parts(model)
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        part = parts[id(param)]
        if part == "language_model" and lora:
            trainable = "lora_" in name
        else:
            trainable = part in train_parts
        param.requires_grad_(trainable)
        if trainable:
            counts[part] += param.numel()
    return counts


def build_param_groups(
    model: nn.Module, learning_rates: dict[str, float], weight_decay: float, decay_names: set[str]
) -> list[dict[str, Any]]:
    """Two groups per part (decay / no decay), each with the part's learning rate; empty groups omitted."""
    parts = parameter_parts(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups.setdefault((parts[id(param)], name in decay_names), []).append(param)
    result = []
    for part in PARTS:
        for decay in (True, False):
            params = groups.get((part, decay))
            if not params:
                continue
            if part not in learning_rates:
                raise ValueError(
                    f"part {part!r} has trainable parameters but no learning rate (learning_rates.{part})"
                )
            result.append(
                {
                    "params": params,
                    "lr": learning_rates[part],
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": part if decay else f"{part}.no_decay",
                }
            )
    return result


class ManagerTrainer(Trainer):
    """HF Trainer plus per-part learning rates, modality-grouped batches and dropped-sample counting.

    Args (besides the Trainer's):
        learning_rates (`dict[str, float]`): learning rate per part (`manager`, `projector`, `vision_tower`,
            `language_model`).
        group_by_modality_length (`bool`, *optional*, defaults to `False`): LLaVA's modality-grouped sampler.
        lora (`bool`, *optional*, defaults to `False`): the model is a PEFT LoRA model; checkpoints then also
            hold the fully trained Manager / projector / tower weights (`non_lora_trainables.safetensors`).
    """

    def __init__(
        self,
        *args,
        learning_rates: dict[str, float],
        group_by_modality_length: bool = False,
        lora: bool = False,
        **kwargs,
    ):
        self.learning_rates = dict(learning_rates)
        self.group_by_modality_length = group_by_modality_length
        self.lora = lora
        self.dropped_samples: set[str] = set()
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:  # a CPU-only run: see fsdp.py
            from .fsdp import switch_on_fsdp

            switch_on_fsdp(self.accelerator, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    # ---- optimizer -----------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay_names = set(self.get_decay_parameter_names(opt_model))
            groups = build_param_groups(opt_model, self.learning_rates, self.args.weight_decay, decay_names)
            if not groups:
                raise ValueError("nothing to train: every parameter is frozen")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # every group has its own
            if self._offloads_optimizer():
                from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload refuses torch optimizers

                betas = optimizer_kwargs.get("betas", (self.args.adam_beta1, self.args.adam_beta2))
                self.optimizer = DeepSpeedCPUAdam(groups, betas=betas, eps=self.args.adam_epsilon, adamw_mode=True)
            else:
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        config = getattr(self.args, "hf_deepspeed_config", None)
        if config is None:
            return False
        device = config.config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        return device in ("cpu", "nvme")

    # ---- data ----------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            from .sampler import ModalityLengthGroupedSampler

            return ModalityLengthGroupedSampler(
                batch_size=self.args.train_batch_size,
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=dataset.modality_lengths,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dropped = inputs.pop("dropped_samples", None)
        if dropped:
            self.dropped_samples.update(dropped)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("dropped_samples", None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.dropped_samples:
            logs["dropped_samples"] = len(self.dropped_samples)
        super().log(logs, start_time)

    # ---- LoRA checkpoints: the fully trained parts travel with the adapter ----------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.lora and self.args.should_save and not self.is_deepspeed_enabled:
            save_non_lora_trainables(self.model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, NON_LORA_TRAINABLES)
        if self.lora and not self.is_deepspeed_enabled and os.path.isfile(path):
            load_non_lora_trainables(model if model is not None else self.model, path)


def non_lora_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable non-LoRA tensors under their names in the unwrapped LLaVA-OV (stable across PEFT)."""
    base = unwrap(model)
    return {
        name: p.detach().cpu().contiguous()
        for name, p in base.named_parameters()
        if p.requires_grad and "lora_" not in name
    }


def save_non_lora_trainables(model: nn.Module, folder: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(non_lora_trainables(model), os.path.join(folder, NON_LORA_TRAINABLES), metadata={"format": "pt"})


def load_non_lora_trainables(model: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = dict(unwrap(model).named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{path}: tensors {missing[:5]} have no parameter in the model")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
