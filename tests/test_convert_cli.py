"""`llava-manager convert SRC OUT [--subfolder ...]`: the output folder round-trips through
AutoModelForImageTextToText / AutoProcessor, and bad input is one clear line with nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_stand_in import (
    IMAGE_ID,
    ORACLE_DIR,
    REPO_ID,
    VIDEO_ID,
    files_under,
    make_repo,
    oracle_prompt,
    oracle_tokenizer,
    populate_hub_cache,
    write_checkpoint,
)
from oracle_cases import load_case, max_logit_diff
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import llava_manager
from llava_manager.checkpoint.files import MARKER
from llava_manager.cli import main
from llava_manager.processor import LlavaOnevisionManagerProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path) -> Path:
    return write_checkpoint("static_all_anyres", tmp_path / "src" / "checkpoint", tower=True)


def oracle_logits_diff(model, processor, case_name="static_all_anyres") -> float:
    case = load_case(case_name)
    image = Image.open(ORACLE_DIR / case_name / case.meta["image_files"][0]).convert("RGB")
    inputs = processor(images=image, text=oracle_prompt(case.meta["input_ids"][0]), return_tensors="pt")
    with torch.no_grad():
        return max_logit_diff(case, model(**inputs).logits)


def test_convert_round_trips_through_the_auto_classes(source, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--no-progress"]) == 0
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    assert isinstance(processor, LlavaOnevisionManagerProcessor)
    reference = llava_manager.load_original(source, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    assert model.config.to_dict()["manager"] == reference.config.to_dict()["manager"]
    reloaded, expected = model.state_dict(), reference.state_dict()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)
    assert oracle_logits_diff(model.eval(), processor) <= 1e-4


def test_convert_a_hub_subfolder(tmp_path):
    repo = make_repo(tmp_path / "repo")
    cache = tmp_path / "hf-cache"
    populate_hub_cache(cache, repo)
    out = tmp_path / "baseline-grid"
    argv = ["convert", REPO_ID, str(out), "--subfolder", "Baseline + Grid", "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.manager is None and model.config.image_layout == {"mode": "anyres", "unpad": "truncate"}
    assert AutoProcessor.from_pretrained(out).image_processor.crop_mode == "anyres"


def test_a_tokenizer_from_elsewhere(source, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    assert main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "has no tokenizer files" in capsys.readouterr().err and not (tmp_path / "out").exists()
    oracle_tokenizer().save_pretrained(tmp_path / "tokenizer")
    argv = ["convert", str(source), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer"), "--no-progress"]
    assert main(argv) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert oracle_logits_diff(AutoModelForImageTextToText.from_pretrained(tmp_path / "out"), processor) <= 1e-4


def test_an_existing_output_folder_is_kept_unless_overwrite(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert", str(source), str(out), "--no-progress"]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert files_under(out) == ["precious.txt"]
    assert main(["convert", str(source), str(out), "--overwrite", "--no-progress"]) == 0
    assert "precious.txt" not in files_under(out) and (out / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_bad_input_is_one_clear_line_and_writes_nothing(source, tmp_path, capsys):
    (source / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("llava-manager convert: error: ") and "probably truncated or corrupt" in err[0]
    assert err[1] == "(run with --debug for the full traceback)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert main(["convert", "nobody/nothing", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "not in the local cache" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_progress_is_shown_for_large_files(source, tmp_path, capsys):
    assert main(["convert", str(source), str(tmp_path / "out"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "writing the processor" in err and "MB" in err and f"-> {tmp_path / 'out'}" in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--subfolder",
        "--revision",
        "--allow-pickle",
        "--overwrite",
        "--tokenizer",
        "Baseline + Grid + Manager",
    ):
        assert option in out


@pytest.mark.slow
def test_the_command_line_and_a_fresh_process_loading_the_output(source, tmp_path):
    """`llava-manager convert`; then a new Python that only imports llava_manager loads OUT with the Auto classes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "llava_manager.cli", "convert", str(source), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    load = (
        "import sys, llava_manager\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        "processor = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "print(type(model).__name__, type(processor).__name__, type(processor.image_processor).__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [
        "LlavaOnevisionManagerForConditionalGeneration",
        "LlavaOnevisionManagerProcessor",
        "LlavaOnevisionManagerImageProcessor",
    ]
