"""tiny_cpu under DeepSpeed on CPU (one process): ZeRO-2 and ZeRO-3 train, save, reload; resume is exact."""

from __future__ import annotations

import pytest
import torch
from train_helpers import ZERO3_PARTITIONED, eval_logits, keep_torch_threads, reload_trained, tiny_recipe

from llava_manager.train.main import train

_threads = pytest.fixture(autouse=True)(keep_torch_threads)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_tiny_cpu_trains_and_reloads(tmp_path, zero):
    extra = ["--deepspeed", "zero2"] if zero == "zero2" else ZERO3_PARTITIONED
    result = train(tiny_recipe(tmp_path, *extra, "--max_steps", "10"))
    losses = result.losses
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # the loss goes down

    trainer = result.trainer
    assert trainer.is_deepspeed_enabled
    assert trainer.model_wrapped.zero_optimization_stage() == (2 if zero == "zero2" else 3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])  # single, multi, text-only
    batch.pop("dropped_samples")
    in_memory = eval_logits(trainer.model_wrapped, batch)  # the engine gathers ZeRO-3 shards itself
    reloaded = reload_trained(result.output_dir)
    assert type(reloaded).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    assert torch.equal(eval_logits(reloaded, batch), in_memory)
    # the Managers were trained (they start at zero) and came back with the model
    scores = [p for n, p in reloaded.model.manager.named_parameters() if "layer_embedding" not in n]
    assert scores and all(p.abs().sum() > 0 for p in scores)
    assert (result.output_dir / "processor_config.json").is_file() or (
        result.output_dir / "preprocessor_config.json"
    ).is_file()
    assert (result.output_dir / "recipe.yaml").is_file()
    if zero == "zero3":
        _generate_matches_the_reloaded_model(trainer, reloaded)


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_bridge_and_tower_train_under_zero3_with_lora(tmp_path, manager_type):
    """Every new parameter (the tower's LayerNorms, scores, temperature and gate; the bridge's scale) is partitioned,
    trained and saved; LoRA on the LLM beside them. The merged output reloads with the engine's logits."""
    lora = ["--lora", "{r: 4, alpha: 8, dropout: 0.0}", "--train_parts", "manager,projector,language_model"]
    recipe = tiny_recipe(
        tmp_path, *ZERO3_PARTITIONED, *lora, "--max_steps", "4", "--manager.manager_type", manager_type
    )
    result = train(recipe)
    trainer = result.trainer
    assert trainer.model_wrapped.zero_optimization_stage() == 3
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    batch.pop("dropped_samples")
    in_memory = eval_logits(trainer.model_wrapped, batch)
    reloaded = reload_trained(result.output_dir)
    assert reloaded.config.manager["manager_type"] == manager_type
    torch.testing.assert_close(eval_logits(reloaded, batch), in_memory, atol=1e-4, rtol=1e-4)  # LoRA merged
    fresh = type(reloaded.model.manager)(reloaded.model.manager.config, reloaded.model.manager.managers[0].width)
    initial = dict(fresh.named_parameters())
    for name, parameter in reloaded.model.manager.named_parameters():  # every one moved from its initial value
        assert not torch.equal(parameter, initial[name]), name


def _generate_matches_the_reloaded_model(trainer, reloaded):
    """ZeRO-3: generate() encodes the image before (outside) the model's forward, where ZeRO-3 has not gathered the
    bare `image_newline` parameter; the patched get_image_features gathers it itself."""
    module = trainer.model_wrapped.module
    newline = module.model.image_newline
    newline.partition()  # the eval forward above may have left it gathered
    assert newline.numel() == 0 and newline.ds_numel > 0  # really partitioned
    sample = next(
        i for i in range(len(trainer.train_dataset)) if trainer.train_dataset[i].get("pixel_values") is not None
    )
    batch = trainer.data_collator([trainer.train_dataset[sample]])
    batch = {k: v for k, v in batch.items() if k not in ("labels", "dropped_samples")}
    assert int(batch["image_sizes"][0].prod()) > 0 and module.config.image_grid_pinpoints  # an AnyRes image
    module.eval()
    with torch.no_grad():
        tokens = module.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, reloaded.generate(**batch, max_new_tokens=4, do_sample=False))


def test_resume_matches_an_uninterrupted_run(tmp_path):
    """Stop at step 4, resume: steps 5..8 (across an epoch boundary) give the same losses (|diff| <= 1e-6)."""
    common = ["--deepspeed", "zero2", "--max_steps", "8", "--save_total_limit", "2"]
    full = train(tiny_recipe(tmp_path / "a", *common, "--save_steps", "4"))
    checkpoint = full.output_dir / "checkpoint-4"
    assert (checkpoint / "global_step4").is_dir()
    resumed = train(tiny_recipe(tmp_path / "b", *common, "--resume_from_checkpoint", str(checkpoint)))

    def by_step(result):
        return {e["step"]: e["loss"] for e in result.log_history if "loss" in e}

    expected, got = by_step(full), by_step(resumed)
    assert sorted(got) == list(range(1, 9))  # steps 1..4 come from the checkpoint's trainer_state.json
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), (step, got, expected)


def test_runs_in_one_process_do_not_leak_deepspeed(tmp_path):
    """accelerate remembers DeepSpeed in a process-wide env var and singletons; the next recipe without
    DeepSpeed (e.g. the demo's second run, or a notebook) must not inherit it."""
    from llava_manager.train.main import build_trainer

    train(tiny_recipe(tmp_path / "a", *ZERO3_PARTITIONED, "--max_steps", "1"))
    trainer, _ = build_trainer(tiny_recipe(tmp_path / "b", "--max_steps", "1"))
    assert not trainer.is_deepspeed_enabled
    assert all(p.numel() > 0 for p in trainer.model.parameters())  # not built under zero.Init
