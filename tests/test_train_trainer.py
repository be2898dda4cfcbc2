"""ManagerTrainer: per-part param groups, frozen parts, LoRA, and errors raised before any process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import keep_torch_threads, tiny_recipe

from llava_manager.attach import unwrap
from llava_manager.train import main as train_main
from llava_manager.train.main import build_trainer, train
from llava_manager.train.recipe import PARTS, RecipeError
from llava_manager.train.trainer import parameter_parts

LRS = "{manager: 3.0e-2, projector: 2.0e-3, vision_tower: 1.0e-4, language_model: 5.0e-4}"

_threads = pytest.fixture(autouse=True)(keep_torch_threads)


def _by_part(model) -> dict[str, dict[str, torch.Tensor]]:
    parts = parameter_parts(model)
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for name, param in model.named_parameters():
        out[parts[id(param)]][name] = param.detach().clone()
    return out


def test_param_groups_carry_the_recipe_learning_rates(tmp_path):
    recipe = tiny_recipe(tmp_path, "--learning_rates", LRS, "--weight_decay", "0.1")
    trainer, _ = build_trainer(recipe)
    model = trainer.model
    optimizer = trainer.create_optimizer()
    parts = parameter_parts(model)
    llava = unwrap(model).model
    # the parts are found by structure: every Manager parameter (layer embedding included) is 'manager'
    assert {id(p) for p in llava.manager.parameters()} == {i for i, part in parts.items() if part == "manager"}
    assert any("layer_embedding" in n for n, _ in llava.manager.named_parameters())
    assert parts[id(llava.image_newline)] == "projector"
    assert parts[id(unwrap(model).lm_head.weight)] == "language_model"

    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        part = group["name"].split(".")[0]
        assert group["lr"] == recipe.learning_rates[part]
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else 0.1)
        for param in group["params"]:
            assert parts[id(param)] == part, names[id(param)]
            if group["weight_decay"]:
                assert "bias" not in names[id(param)] and "norm" not in names[id(param)]
            seen.add(id(param))
    assert seen == {id(p) for p in model.parameters()}  # all four parts trained: every parameter, once
    assert {g["name"].split(".")[0] for g in optimizer.param_groups} == set(PARTS)
    # the scheduler keeps the per-group rates (warmup scales them all alike)
    trainer.create_scheduler(10, optimizer)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [
        recipe.learning_rates[g["name"].split(".")[0]] for g in optimizer.param_groups
    ]


def test_frozen_parts_do_not_change(tmp_path):
    recipe = tiny_recipe(tmp_path, "--train_parts", "manager,projector", "--max_steps", "3")
    trainer, _ = build_trainer(recipe)
    before = _by_part(trainer.model)
    assert all(g["name"].split(".")[0] in ("manager", "projector") for g in trainer.create_optimizer().param_groups)
    trainer.train()
    after = _by_part(trainer.model)
    for part in ("vision_tower", "language_model"):
        for name, tensor in before[part].items():
            assert torch.equal(tensor, after[part][name]), name
    for part in ("manager", "projector"):
        assert any(not torch.equal(t, after[part][n]) for n, t in before[part].items()), part


def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path):
    from transformers import AutoModelForImageTextToText

    recipe = tiny_recipe(
        tmp_path,
        "--lora",
        "{r: 4, alpha: 8, dropout: 0.0}",
        "--max_steps",
        "3",
        "--train_parts",
        "manager,projector,language_model",
    )
    result = train(recipe)
    trainer = result.trainer
    model = trainer.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        "lora_" in n or ".manager." in n or "multi_modal_projector" in n or "image_newline" in n for n in trained
    )
    assert not any("vision_tower" in n and "lora_" in n for n in trained)  # the regex keeps LoRA on the LLM
    # the adapter folder: PEFT adapter + the fully trained parts under stable (unwrapped) names
    from safetensors.torch import load_file

    extra = load_file(str(result.output_dir / "adapter" / "non_lora_trainables.safetensors"))
    assert any(k.startswith("model.manager.") for k in extra) and "model.image_newline" in extra
    assert (result.output_dir / "adapter" / "adapter_config.json").is_file()
    # the HF-format output folder is the merged model: same logits as the trained PEFT model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch.pop("dropped_samples")
    model.eval()
    import llava_manager  # noqa: F401

    merged = AutoModelForImageTextToText.from_pretrained(str(result.output_dir)).eval()
    assert type(merged).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)


def test_stage1_style_square_plain_run(tmp_path):
    """Stage-1 settings on the tiny model: square images (one crop, no newline), plain captions, grouped batches."""
    from llava_manager.train.sampler import ModalityLengthGroupedSampler

    recipe = tiny_recipe(
        tmp_path,
        "--image_aspect_ratio",
        "square",
        "--conv_template",
        "plain",
        "--train_parts",
        "manager,projector",
        "--max_steps",
        "2",
        kinds=("single", "multi"),
    )
    trainer, _ = build_trainer(recipe)
    assert unwrap(trainer.model).config.image_layout["mode"] == "square"
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    item = trainer.train_dataset[1]  # two images, 16 tokens each (one 32x32 crop of 8x8 patches)
    assert item["pixel_values"].shape[:2] == (2, 1)
    assert int((item["input_ids"] == unwrap(trainer.model).config.image_token_id).sum()) == 32
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("patched", [False, True])
def test_continue_from_a_checkpoint_folder(tmp_path, patched):
    """model_name_or_path: an HF LLaVA-OV folder is patched from the recipe; a patched one keeps its Managers."""
    from llava_manager import ManagerConfig, patch_llava
    from llava_manager.testing.tiny import tiny_model, tiny_processor

    model = tiny_model()
    if patched:
        model = patch_llava(model, ManagerConfig(llm_layers=[1, 3], vision_layers=[1, 2]))
    model.save_pretrained(tmp_path / "ckpt")
    tiny_processor(model.config).save_pretrained(tmp_path / "ckpt")
    recipe = tiny_recipe(
        tmp_path,
        "--model_config",
        "null",
        "--processor",
        "null",
        "--model_name_or_path",
        str(tmp_path / "ckpt"),
        "--max_steps",
        "2",
    )
    trainer, _ = build_trainer(recipe)
    config = unwrap(trainer.model).config
    assert config.manager["llm_layers"] == ([1, 3] if patched else [0, 2])  # the recipe's are [0, 2]
    trainer.train()


def test_checkpoint_that_is_not_llava_is_refused(tmp_path, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=300,
        )
    ).save_pretrained(tmp_path / "qwen")
    _no_process_group(monkeypatch)
    recipe = tiny_recipe(
        tmp_path, "--model_config", "null", "--processor", "null", "--model_name_or_path", str(tmp_path / "qwen")
    )
    with pytest.raises(RecipeError, match=r"'model_name_or_path' = .*qwen"):
        build_trainer(recipe)


def _no_process_group(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("TrainingArguments reached: the error came too late")

    monkeypatch.setattr(train_main, "training_arguments", refuse)


@pytest.mark.parametrize("case", ["data_file", "image_folder", "not_llava", "image_count", "missing_image"])
def test_bad_input_fails_before_the_process_group(tmp_path, monkeypatch, case):
    _no_process_group(monkeypatch)
    recipe = tiny_recipe(tmp_path)
    if case == "data_file":
        recipe.data_path, match = str(tmp_path / "nope.json"), r"'data_path'.*no such file"
    elif case == "image_folder":
        recipe.image_folder, match = str(tmp_path / "no_images"), r"'image_folder'.*no such folder"
    elif case == "not_llava":
        from transformers import Qwen2Config

        path = tmp_path / "qwen.json"
        Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300).to_json_file(str(path))
        recipe.model_config, match = str(path), r"'model_config'.*'qwen2' config, not LLaVA-OneVision"
    else:
        data_file = Path(recipe.data_path)
        data = json.loads(data_file.read_text())
        if case == "image_count":
            data[0]["conversations"][0]["value"] = "<image>\n<image>\nWhat?"
            match = r"data.json, sample 0 \(id 'shapes-00000'\).*2 <image> placeholder"
        else:
            data[0]["image"] = "gone.png"
            match = r"id 'shapes-00000'.*gone.png is missing"
        data_file.write_text(json.dumps(data))
    with pytest.raises(Exception, match=match) as error:
        build_trainer(recipe)
    assert isinstance(error.value, ValueError)  # RecipeError / DataError are ManagerErrors (ValueErrors)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from llava_manager.cli import main

    code = main(["train", "tiny_cpu", "--data_path", str(tmp_path / "nope.json"), "--output_dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'data_path'" in err and "Traceback" not in err


def test_recipe_errors_are_recipe_errors():
    assert issubclass(RecipeError, ValueError)


def test_lora_resume_restores_the_fully_trained_parts(tmp_path):
    """Without DeepSpeed a LoRA checkpoint is the adapter plus non_lora_trainables.safetensors; resuming
    from it reproduces the uninterrupted run's losses exactly (|diff| <= 1e-6)."""
    common = ["--lora", "{r: 4}", "--train_parts", "manager,projector,language_model", "--max_steps", "4"]
    full = train(tiny_recipe(tmp_path / "a", *common, "--save_steps", "2", "--save_total_limit", "2"))
    checkpoint = full.output_dir / "checkpoint-2"
    assert (checkpoint / "non_lora_trainables.safetensors").is_file(), sorted(
        p.name for p in checkpoint.parent.rglob("*")
    )
    resumed = train(tiny_recipe(tmp_path / "b", *common, "--resume_from_checkpoint", str(checkpoint)))
    expected = {e["step"]: e["loss"] for e in full.log_history if "loss" in e}
    got = {e["step"]: e["loss"] for e in resumed.log_history if "loss" in e}
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0)
