"""FSDP2 through the HF Trainer on 2 CPU processes (gloo): the shipped `fsdp2` config shards the decoder and SigLIP
layers, keeps the per-part learning rates, checkpoints activations, trains (the loss falls) and saves a model that
reloads with identical logits."""

from __future__ import annotations

import pytest
import torch
from train_helpers import from_checkpoint, run_two_processes, save_checkpoint, shapes_data

RUNNER = r"""
import os, sys, torch
from torch.distributed.tensor import DTensor
from llava_manager.attach import unwrap
from llava_manager.train import load_recipe
from llava_manager.train.main import end_process_group, train
from llava_manager.train.trainer import parameter_parts
from transformers import TrainerCallback

rank = int(os.environ["RANK"])


class Rank1Noise(TrainerCallback):  # before FSDP shards the model: rank 1's copy differs from rank 0's
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if rank == 1 and sys.argv[2] == "noise":
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(1.0)


result = train(load_recipe("tiny_cpu", sys.argv[3:]), callbacks=[Rank1Noise()])
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
wrapped = {
    "decoder": unit(model.model.language_model.layers[0]),
    "tower": unit(model.model.vision_tower.encoder.layers[0]),
    "root": type(model).__name__,
    "sharded_at_load": getattr(model, "is_distributed_loading_by_transformers", False),
}
batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
batch.pop("dropped_samples", None)
model.eval()
with torch.no_grad():
    logits = trainer.model(**batch).logits
torch.save({"groups": groups, "losses": result.losses, "wrapped": wrapped, "batch": dict(batch), "logits": logits,
            "is_fsdp": trainer.is_fsdp_enabled},
           os.path.join(sys.argv[1], f"rank{rank}.pt"))
end_process_group()
"""


RATES = "{manager: 1.0e-2, projector: 4.0e-3, vision_tower: 1.0e-3, language_model: 2.0e-3}"


def _fsdp_run(tmp_path, name: str, *overrides: str, noise: bool = False) -> tuple[list[dict], object]:
    """One 2-process FSDP2 `train` in tmp_path/name; returns each rank's record and the output folder."""
    folder = tmp_path / name
    folder.mkdir()
    data, images = shapes_data(tmp_path / "data", 12, kinds=("single", "multi", "text"))
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    out = folder / "out"
    args = [
        *(str(folder), "noise" if noise else "clean"),
        *("--output_dir", str(out), "--data_path", str(data), "--image_folder", str(images)),
        *("--deepspeed", "null", "--fsdp", "fsdp2", "--learning_rates", RATES),
        *("--train_parts", "manager,projector,language_model", "--per_device_train_batch_size", "2"),
        *("--max_steps", "12", "--save_steps", "0", "--logging_steps", "1", "--warmup_ratio", "0"),
        *("--lr_scheduler_type", "constant", "--seed", "5", "--group_by_modality_length", "false"),
        *overrides,
    ]
    run_two_processes(runner, args, folder, timeout=300, what=f"2-process FSDP2 run ({name})")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


def _assert_trained_and_reloads(ranks: list[dict], out) -> None:
    """The loss fell over the 12 steps, both ranks computed the same logits, and the saved model (a full state dict)
    reloads with them bit for bit, its Managers-only folder beside it."""
    from llava_manager import from_pretrained

    losses = ranks[0]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    reloaded, _ = from_pretrained(out)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(**ranks[0]["batch"]).logits
    assert torch.equal(logits, ranks[0]["logits"])
    assert (out / "managers" / "managers.safetensors").is_file()  # the Managers-only folder beside the model


@pytest.mark.slow
def test_two_process_fsdp2_trains_with_part_rates_and_reloads(tmp_path):
    from llava_manager.train.recipe import load_recipe

    ranks, out = _fsdp_run(tmp_path, "plain")
    rates = RATES

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
            "sharded_at_load": False,
        }
    _assert_trained_and_reloads(ranks, out)


@pytest.mark.slow
def test_cpu_ram_efficient_loading_takes_rank0s_weights(tmp_path):
    """With `cpu_ram_efficient_loading`, accelerate shards the model on the meta device and broadcasts rank 0's
    weights (the Managers included: `patch_llava` created them on every rank): a rank whose copy differs trains
    exactly as if it had rank 0's."""
    clean, _ = _fsdp_run(tmp_path, "clean", "--fsdp.cpu_ram_efficient_loading", "true")
    noisy, _ = _fsdp_run(tmp_path, "noisy", "--fsdp.cpu_ram_efficient_loading", "true", noise=True)
    assert len(clean[0]["losses"]) == 12
    assert noisy[0]["losses"] == clean[0]["losses"]
    assert torch.equal(noisy[1]["logits"], clean[1]["logits"])


@pytest.mark.slow
def test_fsdp2_sharded_at_load_trains_with_part_rates_and_reloads(tmp_path):
    """`fsdp_loading: sharded`: transformers shards the checkpoint while loading it (each rank reads its shard) and
    owns the FSDP2 units; the Managers, added afterwards, stay whole on every rank and the Trainer keeps them in
    step. Per-part rates, a falling loss, and a saved model that reloads with the sharded model's logits."""
    from transformers import Trainer

    from llava_manager.testing.tiny import tiny_model

    if not hasattr(Trainer, "_sync_replicated_trainable_parameters"):
        pytest.skip("this transformers cannot train models sharded at load")
    base = save_checkpoint(tiny_model(seed=2), tmp_path / "base")
    ranks, out = _fsdp_run(tmp_path, "sharded", *from_checkpoint(base), "--fsdp_loading", "sharded")
    for rank in ranks:
        assert rank["wrapped"]["sharded_at_load"] is True and not rank["is_fsdp"]  # not wrapped again by accelerate
        assert rank["wrapped"]["decoder"][0].startswith("FSDP")  # transformers' own FSDP2 units
        names = {g["name"] for g in rank["groups"]}
        assert names == {f"{p}{s}" for p in ("projector", "language_model") for s in ("", ".no_decay")} | {"manager"}
        for group in rank["groups"]:
            part = group["name"].split(".")[0]
            assert group["parts"] == [part]
            assert group["sharded"] == (part != "manager"), group  # the Managers were added after sharding
    assert ranks[0]["losses"] == ranks[1]["losses"]
    _assert_trained_and_reloads(ranks, out)
