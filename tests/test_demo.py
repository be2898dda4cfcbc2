"""The demo: synthetic data, and its whole pipeline at a small step count (the full run is `slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_manager.cli import main
from llava_manager.demo import run_demo, write_demo_dataset
from llava_manager.demo.pipeline import normalise
from llava_manager.demo.shapes import COLORS, POSITIONS, QUESTIONS, SHAPES
from llava_manager.testing.tiny import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- the data ---------------------------------------------------------------------------------------------
def test_dataset_is_llava_format_with_a_disjoint_heldout_split(tmp_path):
    from llava_manager.train.data import load_samples

    data = write_demo_dataset(tmp_path, n_train=24, n_heldout=6, seed=3)
    samples = load_samples(data.train_json, data.image_folder, check_images="open", on_bad_image="error", seed=0)
    assert len(samples.samples) == 24 and not samples.skipped
    heldout = data.heldout_samples()
    assert len(heldout) == 6 * len(QUESTIONS)
    train_images = {s["image"] for s in json.loads(data.train_json.read_text())}
    assert not train_images & {s["image"] for s in heldout}
    answers = {kind: set() for kind in QUESTIONS}
    for sample in heldout:
        answers[sample["question_type"]].add(sample["conversations"][1]["value"])
        with Image.open(data.image_folder / sample["image"]) as image:
            assert image.size == (64, 64)
    assert answers["color"] <= set(COLORS) and answers["shape"] <= set(SHAPES)
    assert answers["position"] <= set(POSITIONS)


def test_every_word_is_in_the_tiny_vocabulary(tmp_path):
    tokenizer = tiny_tokenizer()
    data = write_demo_dataset(tmp_path, n_train=24, n_heldout=2)
    for record in json.loads(data.train_json.read_text()):
        for turn in record["conversations"]:
            text = turn["value"].replace("<image>\n", "")
            assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
            if turn["from"] == "gpt":
                assert len(tokenizer.tokenize(text)) == 1  # one-word answers: one token


def test_training_set_covers_every_combination_evenly(tmp_path):
    data = write_demo_dataset(tmp_path, n_train=len(COLORS) * len(SHAPES) * len(POSITIONS), n_heldout=1)
    seen = set()
    for record in json.loads(data.train_json.read_text()):
        answers = {record["conversations"][i]["value"] for i in (1, 3, 5)}
        seen.add(frozenset(answers))
    assert len(seen) == len(COLORS) * len(SHAPES) * len(POSITIONS)


def test_same_seed_same_files(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_train=5, n_heldout=2, seed=7)
    b = write_demo_dataset(tmp_path / "b", n_train=5, n_heldout=2, seed=7)
    assert a.train_json.read_text() == b.train_json.read_text()
    assert (a.image_folder / "train-0003.png").read_bytes() == (b.image_folder / "train-0003.png").read_bytes()


def test_answers_are_scored_on_their_first_word():
    assert normalise("Red.") == "red" and normalise(" left, I think") == "left"
    assert normalise("") == "" and normalise("?!") == ""
    assert normalise("squares") != "square"  # exact match: no stemming


# ---- the demo's model ------------------------------------------------------------------------------------------
def test_demo_recipe_builds_the_wider_model_with_the_larger_llm_initialisation():
    """The demo learns because its LLM starts with std 0.06 weights (the tiny model's 0.02 leaves attention uniform
    and training on a plateau): transformers must honour text_config.initializer_range when it builds the model."""
    from llava_manager.train.model_setup import load_for_training
    from llava_manager.train.recipe import load_recipe

    recipe = load_recipe("demo")
    assert recipe.model_config_path().name == "demo.json"
    model, processor = load_for_training(recipe)
    config = model.config
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (64, 128)
    stds = {}
    for name, parameter in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) and "language_model" in name:
            stds[name] = parameter.detach().std().item()
    assert len(stds) == 3 * config.text_config.num_hidden_layers
    for name, std in stds.items():
        assert abs(std - config.text_config.initializer_range) < 0.006, (name, std)
    assert config.text_config.initializer_range == pytest.approx(0.06)
    tiny = load_for_training(load_recipe("tiny_cpu"))[0]
    tiny_q = tiny.model.language_model.layers[0].self_attn.q_proj.weight.std().item()
    assert tiny_q < 0.03  # the tiny model keeps transformers' default 0.02


# ---- the pipeline, small -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo's core with 3 steps per model and a handful of images, --compare included."""
    import torch

    lines: list[str] = []
    before = dict(os.environ), torch.get_num_threads()
    result = run_demo(
        tmp_path_factory.mktemp("demo") / "out",
        steps=3,
        compare=True,
        train_images=8,
        heldout_images=2,
        say=lines.append,
    )
    result.process_state_before_and_after = (before, (dict(os.environ), torch.get_num_threads()))
    return result, lines


def test_demo_writes_everything_it_promises(small_demo):
    result, lines = small_demo
    out = result.output_dir
    for path in (
        result.weights_png,
        result.loss_png,
        result.summary_json,
        result.data.train_json,
        out / "manager" / "model.safetensors",
        out / "manager" / "config.json",
        out / "baseline" / "model.safetensors",
        out / "manager" / "train.log",
    ):
        assert Path(path).is_file(), path
    printed = "\n".join(lines)
    for path in (result.weights_png, result.loss_png, result.summary_json, out / "manager", out / "baseline"):
        assert str(path) in printed  # the output says where everything was written
    assert "[1/6]" in printed and "[6/6]" in printed and "held-out accuracy" in printed
    assert "DeepSpeed zero2" in printed  # trained through the tiny_cpu recipe's DeepSpeed config


def test_demo_trained_through_the_recipe_and_reports_honest_scores(small_demo):
    result, _ = small_demo
    summary = json.loads(result.summary_json.read_text())
    assert summary["steps"] == 3
    for name in ("manager", "baseline"):
        run = summary["runs"][name]
        assert [step for step, _ in run["losses"]] == [1, 2, 3]
        assert 0.0 <= run["heldout_accuracy"] <= 1.0
        assert run["heldout_total"] == 2 * len(QUESTIONS)
        recorded = summary["answers"][name]
        assert run["heldout_correct"] == sum(a["correct"] for a in recorded)
        # every verdict recomputed from the model's own answer, and the per-kind accuracy from the verdicts
        for answer in recorded:
            assert answer["correct"] == (normalise(answer["answer"]) == answer["expected"])
        for kind in QUESTIONS:
            verdicts = [a["correct"] for a in recorded if a["type"] == kind]
            assert run["heldout_accuracy_by_type"][kind] == pytest.approx(sum(verdicts) / len(verdicts))
    recipe = (result.output_dir / "manager" / "recipe.yaml").read_text()
    assert "deepspeed: zero2" in recipe and "max_steps: 3" in recipe
    config = json.loads((result.output_dir / "manager" / "config.json").read_text())
    assert config["model_type"] == "llava_onevision_manager" and config["manager"]["llm_layers"] == [0, 2]
    baseline = json.loads((result.output_dir / "baseline" / "config.json").read_text())
    assert baseline.get("manager") is None  # the unpatched model


def test_demo_leaves_the_process_as_it_found_it(small_demo):
    """In-process training sets RANK, ACCELERATE_USE_DEEPSPEED, ... and the thread count; the demo undoes that,
    so later subprocesses (and numerics that depend on the thread count) are not affected."""
    result, _ = small_demo
    (env_before, threads_before), (env_after, threads_after) = result.process_state_before_and_after
    assert env_after == env_before
    assert threads_after == threads_before


def test_demo_pngs_are_images(small_demo):
    result, _ = small_demo
    for path in (result.weights_png, result.loss_png):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 250


def test_chat_and_inspect_on_the_demo_output(small_demo, tmp_path, capsys):
    result, _ = small_demo
    model_dir = result.output_dir / "manager"
    image = result.data.image_folder / result.example["image"]
    assert (
        main(
            ["chat", str(model_dir), "--image", str(image), "--max-new-tokens", "3", QUESTIONS[result.example["type"]]]
        )
        == 0
    )
    assert main(["inspect", str(model_dir), "--out", str(tmp_path / "w.png")]) == 0
    assert result.weights_table in capsys.readouterr().out
    assert (tmp_path / "w.png").is_file()


def test_a_second_demo_replaces_the_first(tmp_path):
    from llava_manager.demo.pipeline import DemoError, _prepare_output

    out = tmp_path / "demo"
    _prepare_output(out)
    (out / "baseline").mkdir()
    (out / "baseline" / "old.txt").write_text("from the last run")
    _prepare_output(out)  # an earlier demo's folder: emptied
    assert [p.name for p in out.iterdir()] == [".llava_manager_demo"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not empty"):
        _prepare_output(tmp_path / "other")  # anything else: untouched
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---- the real command, end to end --------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """What `make demo DEMO_ARGS=--compare` runs, as a user runs it (fewer steps than the default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.pop("OMP_NUM_THREADS", None)
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "llava_manager.cli", "demo", "--output-dir", str(out), "--steps", "40", "--compare"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout and str(out / "loss_curves.png") in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["runs"]["manager"]["last_loss"] < summary["runs"]["manager"]["first_loss"]
