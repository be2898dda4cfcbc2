"""Recipes, DeepSpeed JSONs, overrides and their errors (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_manager.train.recipe import (
    Recipe,
    RecipeError,
    find_config,
    load_recipe,
    parse_overrides,
    resolve_accumulation,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs(name):
    config = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
    assert "optimizer" not in config and "scheduler" not in config  # per-part learning rates survive
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == (name == "zero3_offload")


def test_tiny_model_config_matches_tiny_py():
    from transformers import LlavaOnevisionConfig

    from llava_manager.testing.tiny import tiny_config

    shipped = LlavaOnevisionConfig.from_json_file(str(ROOT / "configs" / "models" / "tiny.json")).to_dict()
    built = tiny_config().to_dict()
    for config in (shipped, built):
        config.pop("transformers_version", None)
    assert shipped == built


ALL_PARTS = ["manager", "projector", "vision_tower", "language_model"]
LATE_LRS = {"manager": 5e-5, "projector": 1e-5, "vision_tower": 2e-6, "language_model": 1e-5}
PAPER = {  # reference doc, training recipe table
    "stage1": {
        "parts": ["manager", "projector"],
        "lrs": {"manager": 1e-3, "projector": 1e-3},
        "max_len": 8192,
        "template": "plain",
        "aspect": "square",
    },
    "stage1_5": {
        "parts": ALL_PARTS,
        "lrs": LATE_LRS,
        "max_len": 16384,
        "template": "qwen_1_5",
        "aspect": "anyres_max_9",
    },
    "stage2_si": {
        "parts": ALL_PARTS,
        "lrs": LATE_LRS,
        "max_len": 16384,
        "template": "qwen_1_5",
        "aspect": "anyres_max_9",
    },
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_stage_recipes_follow_the_paper(name):
    recipe, paper = load_recipe(name), PAPER[name]
    assert recipe.train_parts == paper["parts"] and recipe.learning_rates == paper["lrs"]
    assert recipe.model_max_length == paper["max_len"] and recipe.conv_template == paper["template"]
    assert recipe.image_aspect_ratio == paper["aspect"]
    assert (recipe.num_train_epochs, recipe.lr_scheduler_type, recipe.warmup_ratio, recipe.weight_decay) == (
        1.0,
        "cosine",
        0.03,
        0.0,
    )
    assert recipe.bf16 and recipe.gradient_checkpointing and recipe.global_batch_size == 512
    assert recipe.per_device_train_batch_size * resolve_accumulation(recipe, 8) * 8 == 512
    assert recipe.per_device_train_batch_size * resolve_accumulation(recipe, 16) * 16 == 512
    assert recipe.manager["manager_type"] == "static"
    assert "optimizer" not in recipe.deepspeed_config()
    if name == "stage1_5":
        assert recipe.resolve_pinpoints(384) == [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    if name == "stage2_si":
        grid = recipe.resolve_pinpoints(384)
        assert len(grid) == 36 and grid[0] == [384, 384] and grid[-1] == [2304, 2304]


def test_the_video_recipe_is_the_onevision_stage_on_top_of_stage2_si():
    """LLaVA-NeXT's finetune_ov.sh: 32 frames (force-sampled), max length 32768, the stage-2 rates; from stage2_si."""
    recipe, stage2 = load_recipe("video"), load_recipe("stage2_si")
    assert recipe.model_name_or_path == "outputs/stage2_si" and recipe.frames_upbound == 32
    assert recipe.model_max_length == 32768 and recipe.video_folder and recipe.manager["video"] is True
    assert recipe.train_parts == ALL_PARTS and recipe.learning_rates == LATE_LRS
    changed = {k for k, v in recipe.to_dict().items() if stage2.to_dict()[k] != v}
    assert changed == {
        "model_name_or_path",
        "manager",
        "data_path",
        "image_folder",
        "video_folder",
        "model_max_length",
        "output_dir",
    }
    with pytest.raises(RecipeError, match="frames_upbound"):
        load_recipe("video", ["--frames_upbound", "0"])
    with pytest.raises(RecipeError, match="on_bad_video"):
        load_recipe("video", ["--on_bad_video", "ignore"])


def test_a_pinpoint_range_reads_as_the_original_does():
    """'(AxB)' is A crops across and B down, listed A outer, as LLaVA-NeXT's mm_utils reads it; a recipe and a
    converted checkpoint's config (convert_config) read the same string the same way."""
    from llava_manager.checkpoint.original import _original_pinpoints

    recipe = load_recipe("tiny_cpu", ["--image_grid_pinpoints", "(1x1),...,(2x3)"])
    by_hand = [[10, 10], [20, 10], [30, 10], [10, 20], [20, 20], [30, 20]]  # [height, width], width outer
    assert recipe.resolve_pinpoints(10) == by_hand
    assert _original_pinpoints("(1x1),...,(2x3)", 10) == by_hand
    assert _original_pinpoints([[20, 10]], 10) == [[10, 20]]  # an explicit original list holds (width, height)
    with pytest.raises(RecipeError, match=r"'image_grid_pinpoints'.*first grid must be"):
        load_recipe("tiny_cpu", ["--image_grid_pinpoints", "(3x1),...,(2x2)"])


def test_overrides_are_typed():
    recipe = load_recipe(
        "tiny_cpu",
        [
            "--learning_rates.manager",
            "5e-5",
            "--train_parts",
            "manager,projector",
            "--manager.grid=base",
            "--max_steps",
            "3",
            "--gradient_checkpointing",
            "--local_rank=0",
            "--deepspeed.zero_optimization.stage",
            "3",
        ],
    )
    assert recipe.learning_rates["manager"] == 5e-5 and recipe.train_parts == ["manager", "projector"]
    assert recipe.manager["grid"] == "base" and recipe.max_steps == 3 and recipe.gradient_checkpointing is True
    assert recipe.deepspeed_config()["zero_optimization"]["stage"] == 3
    assert parse_overrides(["--a", "[1, 2]", "--b", "null"]) == {"a": [1, 2], "b": None}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--max_step", "3"], r"unknown recipe key 'max_step'.*did you mean 'max_steps'"),
        (["--per_device_train_batch_size", "0"], r"'per_device_train_batch_size' = 0.*>= 1"),
        (["--conv_template", "chatml"], r"'conv_template' = 'chatml'.*qwen_1_5, plain"),
        (["--manager.grid", "main"], r"'manager'.*grid='main'.*'base'"),
        (["--manager.gird", "base"], r"'manager.gird'.*did you mean 'grid'"),
        (["--learning_rates.llm", "1e-5"], r"'learning_rates.llm'.*unknown part"),
        (["--learning_rates.manager", "fast"], r"'learning_rates.manager' = 'fast'.*number"),
        (
            [
                "--train_parts",
                "manager,projector,vision_tower",
                "--learning_rates",
                "{manager: 1.0e-3, projector: 1.0e-3}",
            ],
            r"'learning_rates.vision_tower'.*give it a learning rate",
        ),
        (["--train_parts", "mlp"], r"'train_parts'.*unknown part 'mlp'"),
        (["--deepspeed", "zero4"], r"'deepspeed' = 'zero4'.*no such file"),
        (["--image_grid_pinpoints", "(1x1)-(6x6)"], r"'image_grid_pinpoints'"),
        (["--image_aspect_ratio", "anyres_9"], r"'image_aspect_ratio' = 'anyres_9'"),
        (["--warmup_ratio", "1.5"], r"'warmup_ratio'"),
        (["--training_args.learning_rat", "1"], r"'training_args.learning_rat'.*not a TrainingArguments field"),
        (["--manager", "null"], r"'train_parts'.*'manager' is null"),
        (["--lora", "{r: 8}", "--train_parts", "manager"], r"'lora'.*add 'language_model'"),
        (["--gradient_accumulation_steps", "auto"], r"'auto' needs global_batch_size"),
        (["--fsdp", "fsdp3"], r"'fsdp' = 'fsdp3'.*no such file.*fsdp2, fsdp2_offload"),
        (["--fsdp", "fsdp2", "--deepspeed", "zero3"], r"'fsdp'.*DeepSpeed or FSDP, not both: set deepspeed: null"),
        (["--fsdp", "{version: 1}", "--deepspeed", "null"], r"'fsdp'.*only FSDP2.*\"version\": 2"),
        (
            ["--fsdp", "fsdp2", "--deepspeed", "null", "--gradient_checkpointing", "true"],
            r"'gradient_checkpointing'.*activation_checkpointing",
        ),
        (["--fsdp", "[1]"], r"'fsdp'.*JSON path, a shipped name"),
        (["--fsdp_loading", "lazy"], r"'fsdp_loading' = 'lazy'.*accelerate, sharded"),
        (["--fsdp_loading", "sharded"], r"'fsdp_loading'.*set fsdp"),
        (
            ["--fsdp_loading", "sharded", "--fsdp", "fsdp2", "--deepspeed", "null"],
            r"'fsdp_loading'.*model_name_or_path",
        ),
    ],
)
def test_bad_recipe_values_name_the_key(overrides, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("tiny_cpu", overrides)


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_config: tiny\nprocessor: tiny\ndata_path: x.json\nlearning_rate: 1.0e-3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'learning_rate'.*did you mean 'learning_rates'"):
        load_recipe(str(bad))
    with pytest.raises(
        RecipeError, match=r"not a shipped recipe \(demo, stage1, stage1_5, stage2_si, tiny_cpu, video; ablations: "
    ):
        load_recipe(str(tmp_path / "missing.yaml"))
    optimizer = tmp_path / "ds.json"
    optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(RecipeError, match="remove the DeepSpeed 'optimizer' block"):
        load_recipe("tiny_cpu", ["--deepspeed", str(optimizer)])


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_offload"])
def test_fsdp_configs_become_trainer_fsdp2_plugins(name):
    """The shipped FSDP2 configs: decoder and SigLIP layers as units, activation checkpointing, full state dicts
    on save; TrainingArguments turns them into accelerate's FSDP2 plugin arguments."""
    from llava_manager.train.arguments import training_arguments

    recipe = load_recipe("tiny_cpu", ["--fsdp", name, "--deepspeed", "null", "--fsdp.reshard_after_forward", "false"])
    assert recipe.fsdp_config() is not None and recipe.deepspeed is None and recipe.zero_stage() == 0
    args = training_arguments(recipe, 1, None)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer,SiglipEncoderLayer"
    assert plugin["activation_checkpointing"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["reshard_after_forward"] is False  # the dotted override reached into the shipped file's keys
    assert bool(plugin.get("cpu_offload")) == (name == "fsdp2_offload")
    assert args.deepspeed is None


def test_sharded_fsdp_loading_lets_transformers_own_the_units(tmp_path):
    """`fsdp_loading: sharded`: no accelerate FSDP plugin (the model is sharded at load), model-only checkpoints,
    the config's activation checkpointing becomes transformers' (non-reentrant)."""
    from llava_manager.train.arguments import training_arguments

    overrides = ["--fsdp", "fsdp2", "--deepspeed", "null", "--fsdp_loading", "sharded"]
    overrides += ["--model_config", "null", "--model_name_or_path", str(tmp_path), "--processor", "null"]
    recipe = load_recipe("tiny_cpu", overrides)
    assert recipe.loads_sharded()
    args = training_arguments(recipe, 1, None)
    assert not args.fsdp and args.fsdp_plugin_args is None and args.save_only_model
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_global_batch_must_add_up():
    recipe = load_recipe("stage2_si", ["--gradient_accumulation_steps", "4"])
    with pytest.raises(RecipeError, match=r"global_batch_size' = 512 but .* 4 x 4 x 8 = 128"):
        resolve_accumulation(recipe, 8)
    with pytest.raises(RecipeError, match="not a multiple"):
        resolve_accumulation(load_recipe("stage2_si"), 3)


def test_shipped_names_resolve():
    assert find_config("zero3", "deepspeed", (".json",)).name == "zero3.json"
    assert find_config("tiny", "models", (".json",)).name == "tiny.json"
    assert set(Recipe.keys()) >= {"manager", "learning_rates", "lora", "deepspeed", "training_args"}


def test_cli_prints_the_resolved_recipe(capsys):
    from llava_manager.cli import main

    assert main(["train", "tiny_cpu", "--max_steps", "7", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "model_config: tiny" in out
    assert main(["train", "--max_steps", "7", "--print-recipe"]) == 0  # RECIPE defaults to tiny_cpu
    assert "max_steps: 7" in capsys.readouterr().out
    assert main(["train", "tiny_cpu", "--bogus", "1"]) == 2
    assert "unknown recipe key 'bogus'" in capsys.readouterr().err
