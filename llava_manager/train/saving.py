"""What a run leaves in its output folder besides the Trainer's own saves: the dropped-samples report (gathered
over ranks), for LoRA runs the adapter plus the merged HF-format model, and after a failure nothing new but its
checkpoints."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("llava_manager.train")


@contextlib.contextmanager
def remove_what_a_failed_run_created(output_dir: Path):
    """On an exception, remove the entries of `output_dir` that were not there before, except `checkpoint-*`
    folders (a resume can use them), and `output_dir` itself when the run created it and nothing is kept.
    Only the main process removes (RANK 0); the exception goes on."""
    existed = output_dir.is_dir()
    before = {entry.name for entry in output_dir.iterdir()} if existed else set()
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0 and output_dir.is_dir():
            _remove_new_entries(output_dir, before, existed)
        raise


def _remove_new_entries(output_dir: Path, before: set[str], existed: bool) -> None:
    kept = []
    for entry in sorted(output_dir.iterdir()):
        if entry.name in before:
            continue
        if entry.name.startswith("checkpoint-") and entry.is_dir():
            kept.append(entry.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if kept:
        logger.warning("the run failed; kept %s in %s for --resume_from_checkpoint", ", ".join(kept), output_dir)
    elif not existed:
        with contextlib.suppress(OSError):  # not empty: something else writes there now; leave it
            output_dir.rmdir()


def gather_dropped(trainer, skipped: list[str]) -> dict[str, list[str]]:
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
