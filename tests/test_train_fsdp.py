"""FSDP2 through the HF Trainer on 2 CPU processes (gloo): the shipped `fsdp2` config shards the decoder and SigLIP
layers, keeps the per-part learning rates, checkpoints activations, trains (the loss falls) and saves a model that
reloads with identical logits."""

from __future__ import annotations

import pytest
import torch
from train_helpers import run_two_processes, shapes_data

RUNNER = r"""
import os, sys, torch
from torch.distributed.tensor import DTensor
from llava_manager.attach import unwrap
from llava_manager.train import load_recipe
from llava_manager.train.main import end_process_group, train
from llava_manager.train.trainer import parameter_parts

result = train(load_recipe("tiny_cpu", sys.argv[2:]))
trainer = result.trainer
model = unwrap(trainer.model)
parts = parameter_parts(model)
groups = []
for group in trainer.optimizer.param_groups:
    owners = {parts[id(p)] for p in group["params"]}
    groups.append({"name": group["name"], "initial_lr": group["initial_lr"], "parts": sorted(owners),
                   "sharded": all(isinstance(p, DTensor) for p in group["params"])})
def unit(layer):  # (the FSDP unit's class, the layer's class inside the activation-checkpoint wrapper)
    return type(layer).__name__, type(getattr(layer, "_checkpoint_wrapped_module", layer)).__name__
wrapped = {"decoder": unit(model.model.language_model.layers[0]), "tower": unit(model.model.vision_tower.encoder.layers[0]),
           "root": type(model).__name__}
batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
batch.pop("dropped_samples", None)
model.eval()
with torch.no_grad():
    logits = trainer.model(**batch).logits
rank = int(os.environ["RANK"])
torch.save({"groups": groups, "losses": result.losses, "wrapped": wrapped, "batch": dict(batch), "logits": logits,
            "is_fsdp": trainer.is_fsdp_enabled},
           os.path.join(sys.argv[1], f"rank{rank}.pt"))
end_process_group()
"""


@pytest.mark.slow
def test_two_process_fsdp2_trains_with_part_rates_and_reloads(tmp_path):
    from llava_manager import from_pretrained
    from llava_manager.train.recipe import load_recipe

    data, images = shapes_data(tmp_path / "data", 12, kinds=("single", "multi", "text"))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "out"
    rates = "{manager: 1.0e-2, projector: 4.0e-3, vision_tower: 1.0e-3, language_model: 2.0e-3}"
    overrides = [
        *("--output_dir", str(out), "--data_path", str(data), "--image_folder", str(images)),
        *("--deepspeed", "null", "--fsdp", "fsdp2", "--learning_rates", rates),
        *("--train_parts", "manager,projector,language_model", "--per_device_train_batch_size", "2"),
        *("--max_steps", "12", "--save_steps", "0", "--logging_steps", "1", "--warmup_ratio", "0"),
        *("--lr_scheduler_type", "constant", "--seed", "5", "--group_by_modality_length", "false"),
    ]
    run_two_processes(runner, [str(tmp_path), *overrides], tmp_path, timeout=300, what="2-process FSDP2 run")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    for rank in ranks:
        assert rank["is_fsdp"]
        # one group per part and decay kind, each with the recipe's rate, holding only that part's (sharded) params
        recipe = load_recipe("tiny_cpu", ["--learning_rates", rates])
        names = {g["name"] for g in rank["groups"]}
        expected = {f"{p}{s}" for p in ("projector", "language_model") for s in ("", ".no_decay")}
        assert names == expected | {"manager"}  # the Managers have no bias or norm: no no_decay group
        for group in rank["groups"]:
            part = group["name"].split(".")[0]
            assert group["parts"] == [part] and group["initial_lr"] == recipe.learning_rates[part]
            assert group["sharded"], group
        # decoder and SigLIP layers are FSDP units (fully_shard turns a class into FSDP<name>) around an activation
        # checkpoint wrapper; the root unit holds the rest (embeddings, projector, Managers, newline)
        assert rank["wrapped"] == {
            "decoder": ("FSDPCheckpointWrapper", "Qwen2DecoderLayer"),
            "tower": ("FSDPCheckpointWrapper", "SiglipEncoderLayer"),
            "root": "FSDPLlavaOnevisionManagerForConditionalGeneration",
        }
    losses = ranks[0]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # the saved model (full state dict, rank 0) reloads with the sharded model's logits, bit for bit
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    reloaded, _ = from_pretrained(out)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(**ranks[0]["batch"]).logits
    assert torch.equal(logits, ranks[0]["logits"])
