"""The paper's ablations as shipped recipes (configs/ablations/, on top of stage2_si): what each one changes, read
back through `--print-recipe`, and two training steps of each on a tiny model of the paper's depths."""

import json

import pytest
import yaml
from train_helpers import keep_torch_threads

from llava_manager.cli import main
from llava_manager.train import train
from llava_manager.train.recipe import RecipeError, find_config, load_recipe, shipped_names

_keep_threads = pytest.fixture(autouse=True)(keep_torch_threads)

# the paper's settings (arXiv 2506.11515, Figs. 9-11 and Appendix A), written out here independently of the files;
# paper layer [a;26] is hidden_states index a-1 .. 25
PAPER_MANAGER = {
    "layers_20_26": {"vision_layers": list(range(19, 26))},
    "layers_14_26": {"vision_layers": list(range(13, 26))},
    "layers_1_26": {"vision_layers": list(range(0, 26))},
    **{f"managers_{n}": {"llm_layers": list(range(0, 24, 24 // n))} for n in (1, 2, 3, 4, 6, 8, 12, 24)},
    "grid_base": {"grid": "base"},
    "grid_grid": {"grid": "grid"},
    "grid_all": {"grid": "all"},
    "static": {"manager_type": "static"},
    "adaptive": {"manager_type": "adaptive_cross"},
    "bridge": {"manager_type": "bridge", "vision_layers": list(range(20, 26))},
    "tower": {"manager_type": "tower"},
    "baseline": None,
}


def test_every_shipped_ablation_is_known_here():
    assert sorted(shipped_names("ablations")) == sorted(PAPER_MANAGER)


@pytest.mark.parametrize("name", sorted(PAPER_MANAGER))
def test_an_ablation_changes_only_its_setting_of_stage2_si(name, capsys):
    assert main(["train", name, "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    stage2 = load_recipe("stage2_si").to_dict()
    wanted = PAPER_MANAGER[name]
    if wanted is None:
        assert printed["manager"] is None and "manager" not in printed["train_parts"]
    else:
        assert printed["manager"] == {**stage2["manager"], **wanted}  # the base's other Manager settings kept
    changed = {k for k in stage2 if printed[k] != stage2[k]}
    assert changed <= {"manager", "output_dir", "train_parts"}
    assert printed["output_dir"] == f"outputs/ablations/{name}"


def test_a_recipe_base_chain_merges_and_its_errors_name_the_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: grid_base\nmanager:\n  jitter: 0.0\nlearning_rates:\n  manager: 1.0e-4\n")
    recipe = load_recipe(str(child))
    assert recipe.manager["grid"] == "base" and recipe.manager["jitter"] == 0.0  # grandparent, parent, child
    assert recipe.learning_rates["manager"] == 1e-4 and recipe.learning_rates["projector"] == 1e-5
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="comes back to itself"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: no_such_recipe\n")
    with pytest.raises(RecipeError, match=r"'no_such_recipe' \(the base of .*c.yaml\).*ablations: "):
        load_recipe(str(tmp_path / "c.yaml"))


def _paper_depth_tiny_model(folder):
    """The tiny model (configs/models/tiny.json) with the paper's depths: SigLIP of 26 layers, LLM of 24."""
    config = json.loads(find_config("tiny", "models", (".json",)).read_text())
    config["vision_config"]["num_hidden_layers"] = 26
    config["text_config"]["num_hidden_layers"] = 24
    config["text_config"]["layer_types"] = ["full_attention"] * 24
    path = folder / "paper_depth_tiny.json"
    path.write_text(json.dumps(config))
    return path


TINY_SIZED = [
    "--model_name_or_path", "null", "--processor", "tiny", "--data_path", "synthetic:4",
    "--image_grid_pinpoints", "(1x1),...,(2x3)", "--model_max_length", "256", "--max_steps", "2",
    "--per_device_train_batch_size", "2", "--global_batch_size", "null", "--gradient_accumulation_steps", "1",
    "--bf16", "false", "--gradient_checkpointing", "false", "--deepspeed", "null", "--save_steps", "0",
    "--logging_steps", "1", "--dataloader_num_workers", "0", "--check_images", "open",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_MANAGER))
def test_an_ablation_trains_two_steps_on_a_tiny_model(name, tmp_path):
    overrides = [*TINY_SIZED, "--model_config", str(_paper_depth_tiny_model(tmp_path))]
    recipe = load_recipe(name, [*overrides, "--output_dir", str(tmp_path / "out")])
    result = train(recipe)
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    manager = result.trainer.model.config.manager if PAPER_MANAGER[name] is not None else None
    if manager is None:
        assert not hasattr(result.trainer.model.model, "manager")
    else:
        for key, value in PAPER_MANAGER[name].items():
            assert manager[key] == value, key
