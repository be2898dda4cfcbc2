"""ZeRO-3 loading under `deepspeed.zero.Init` (`zero3_init`, on by default): a checkpoint is partitioned as it is
loaded, before the Trainer exists, for HF-format (Manager) checkpoints and original-format checkpoints (random models
from a config are built whole: transformers 5.15 cannot initialise them under zero.Init);
the Managers are created partitioned; `zero3_init: false` keeps the old path (whole model until training starts)."""

from __future__ import annotations

import deepspeed
import pytest
import torch
from hub_stand_in import write_checkpoint
from test_patch import perturb
from train_helpers import (
    ZERO3_PARTITIONED,
    eval_logits,
    from_checkpoint,
    keep_torch_threads,
    reload_trained,
    save_checkpoint,
    tiny_recipe,
)

from llava_manager import ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_model
from llava_manager.train.main import build_trainer, train

_threads = pytest.fixture(autouse=True)(keep_torch_threads)


def _partitioned(model) -> tuple[int, int]:
    """(partitioned parameters, all parameters) of `model`."""
    parameters = list(model.parameters())
    return sum(hasattr(p, "ds_id") for p in parameters), len(parameters)


@pytest.mark.parametrize("zero3_init", [True, False])
def test_a_checkpoint_is_loaded_partitioned(tmp_path, zero3_init):
    source = save_checkpoint(tiny_model(), tmp_path / "source")
    recipe = tiny_recipe(
        tmp_path, *ZERO3_PARTITIONED, *from_checkpoint(source), "--zero3_init", str(zero3_init).lower()
    )
    assert recipe.partitions_at_load() is zero3_init
    trainer, _ = build_trainer(recipe)
    partitioned, total = _partitioned(trainer.model)
    assert partitioned == (total if zero3_init else 0)
    if zero3_init:  # the Managers too, created under zero.Init (empty shards, whole sizes known)
        manager = trainer.model.model.manager
        for name, parameter in manager.named_parameters():
            assert parameter.numel() == 0 and parameter.ds_numel > 0, name
        # save_managers gathers the shards: whole tensors, the values a gather gives
        from safetensors.torch import load_file

        from llava_manager import save_managers

        saved = load_file(save_managers(trainer.model, tmp_path / "managers") / "managers.safetensors")
        with deepspeed.zero.GatheredParameters(list(manager.parameters())):
            for name, parameter in manager.named_parameters():
                assert torch.equal(saved[f"manager.{name}"], parameter.detach()), name
                assert saved[f"manager.{name}"].numel() == parameter.ds_numel


def test_a_manager_checkpoint_loads_partitioned_and_trains(tmp_path):
    """An HF-format checkpoint with non-zero Managers: loaded shard by shard, its Manager values arrive (the first
    step's loss equals the one of the same run loaded whole), and the saved result reloads with the engine's logits."""
    model = patch_llava(tiny_model(), ManagerConfig(llm_layers=[0, 2]))
    perturb(model)
    common = (*from_checkpoint(save_checkpoint(model, tmp_path / "source")), "--max_steps", "3")
    runs = {}
    for flag in ("true", "false"):
        recipe = tiny_recipe(tmp_path / flag, *ZERO3_PARTITIONED, *common, "--zero3_init", flag)
        runs[flag] = train(recipe)
    assert runs["true"].losses[0] == pytest.approx(runs["false"].losses[0], rel=1e-5)
    result = runs["true"]
    batch = result.trainer.data_collator([result.trainer.train_dataset[i] for i in range(4)])
    batch.pop("dropped_samples")
    torch.testing.assert_close(
        eval_logits(reload_trained(result.output_dir), batch), eval_logits(result.trainer.model_wrapped, batch)
    )


def test_an_original_format_checkpoint_is_converted_whole_then_loaded_partitioned(tmp_path, monkeypatch):
    """The conversion builds its model whole (not under the run's zero.Init); the converted folder then loads
    partitioned, with the released Managers' values (the first loss equals the run with zero3_init false)."""
    monkeypatch.setenv("LLAVA_MANAGER_CACHE", str(tmp_path / "cache"))
    original = write_checkpoint("static_all_anyres", tmp_path / "repo" / "Baseline + Grid + Manager", tower=True)
    common = from_checkpoint(original)
    losses = {}
    for flag in ("true", "false"):
        recipe = tiny_recipe(tmp_path / flag, *ZERO3_PARTITIONED, *common, "--max_steps", "2", "--zero3_init", flag)
        trainer, _ = build_trainer(recipe)
        partitioned, total = _partitioned(trainer.model)
        assert partitioned == (total if flag == "true" else 0)
        trainer.train()
        losses[flag] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-5)


def test_a_sharded_checkpoint_is_read_one_shard_at_a_time(tmp_path, monkeypatch):
    """transformers' ZeRO-3 branch maps every shard before copying any (rank 0 then holds the whole checkpoint's
    pages); `zero3_shards.shard_by_shard` reads a shard only when the previous one is loaded and released. The loaded
    partitioned model still equals the checkpoint, parameter for parameter (modules split across shards included)."""
    import gc
    import weakref

    from llava_manager.checkpoint import zero3_shards

    model = patch_llava(tiny_model(), ManagerConfig(llm_layers=[0, 2]))
    perturb(model)
    source = save_checkpoint(model, tmp_path / "source")
    (source / "model.safetensors").unlink()
    model.save_pretrained(source, max_shard_size="100KB")  # the same weights in shards
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 3
    reads, alive_at_read = [], []
    previous: list[weakref.ref] = []
    real_read = zero3_shards.read_shard

    def spy(load_state_dict, checkpoint_file, kwargs):
        alive_at_read.append(sum(ref() is not None for ref in previous))
        shard = real_read(load_state_dict, checkpoint_file, kwargs)
        reads.append(checkpoint_file)
        previous[:] = [weakref.ref(tensor) for tensor in shard.values()]
        return shard

    monkeypatch.setattr(zero3_shards, "read_shard", spy)
    recipe = tiny_recipe(tmp_path, *ZERO3_PARTITIONED, *from_checkpoint(source))
    trainer, _ = build_trainer(recipe)
    gc.collect()
    assert sorted(reads) == [str(path) for path in shards]  # each shard read once, with values
    assert alive_at_read == [0] * len(shards)  # no tensor of the previous shard left when the next is read
    expected = model.state_dict()
    loaded = trainer.model
    with deepspeed.zero.GatheredParameters(list(loaded.parameters())):
        for name, parameter in loaded.named_parameters():
            assert torch.equal(parameter.detach(), expected[name]), name
