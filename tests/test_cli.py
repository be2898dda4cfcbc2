"""The `llava-manager` command: every subcommand explains itself, `chat` answers, and bad input is one clear
line (plus the --debug hint) with a non-zero exit, never a traceback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_stand_in import ORACLE_DIR, TOWER, write_checkpoint
from PIL import Image
from test_patch import perturb

from llava_manager import ManagerConfig, patch_llava
from llava_manager.cli import SUBCOMMANDS, build_parser, main
from llava_manager.testing.tiny import tiny_model, tiny_processor

REPO_ROOT = Path(__file__).resolve().parents[1]


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_clear_error(capsys, command: str, *words: str) -> None:
    lines = stderr_lines(capsys)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"llava-manager {command}: error: "), lines
    assert lines[1] == "(run with --debug for the full traceback)"
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A patched tiny model with non-zero Managers and its processor, saved in HF format."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = patch_llava(tiny_model(), ManagerConfig(llm_layers=[0, 2]))
    perturb(model)
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "shape.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


# ---- help -----------------------------------------------------------------------------------------------
def test_every_subcommand_is_registered():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    for name in ("build", "chat", "inspect", "demo"):
        assert name in choices
    assert set(choices) <= set(SUBCOMMANDS)


@pytest.mark.parametrize(
    "command, words",
    [
        ("chat", ["--image", "--video", "--frames", "--max-new-tokens", "--temperature", "Hub", "examples"]),
        ("inspect", ["--out", "mean |w|", "adaptive", "tower", "bridge", "examples"]),
        ("build", ["--vision", "--llm", "SigLIP", "image_newline", "stage1", "--seed", "examples"]),
        ("demo", ["--compare", "--steps", "DeepSpeed", "held-out", "--output-dir"]),
    ],
)
def test_help_explains_the_subcommand(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text, f"{command} --help lacks {word!r}"


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "chat" in capsys.readouterr().out


# ---- chat ---------------------------------------------------------------------------------------------------
def test_chat_streams_an_answer(tiny_checkpoint, image, capsys):
    assert (
        main(["chat", str(tiny_checkpoint), "--image", str(image), "--max-new-tokens", "4", "What color is it?"]) == 0
    )
    streamed = capsys.readouterr().out
    assert (
        main(
            [
                "chat",
                str(tiny_checkpoint),
                "--image",
                str(image),
                "--max-new-tokens",
                "4",
                "--no-stream",
                "What color is it?",
            ]
        )
        == 0
    )
    whole = capsys.readouterr().out
    assert streamed.strip() == whole.strip()  # greedy: streaming prints the same answer


def test_chat_with_two_images_and_sampling(tiny_checkpoint, image, capsys):
    argv = [
        "chat",
        str(tiny_checkpoint),
        "--image",
        str(image),
        "--image",
        str(image),
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--no-stream",
        "Which is red?",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # the seed makes sampling reproducible


def test_chat_on_a_converted_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_MANAGER_CACHE", str(tmp_path / "conversions"))
    (tmp_path / TOWER).mkdir()
    shutil.copy(ORACLE_DIR / TOWER / "config.json", tmp_path / TOWER / "config.json")
    image = ORACLE_DIR / "static_all_anyres" / "image_A_500x300.png"
    for case in ("static_all_anyres", "adaptive_zerouni"):
        source = write_checkpoint(case, tmp_path / case)
        out = tmp_path / f"{case}-hf"
        assert main(["convert", str(source), str(out), "--no-progress"]) == 0
        assert main(["chat", str(out), "--image", str(image), "--max-new-tokens", "3", "t30 t31"]) == 0
        assert main(["chat", str(source), "--image", str(image), "--max-new-tokens", "3", "t30 t31"]) == 0  # original


# ---- chat: bad input ---------------------------------------------------------------------------------------
def test_chat_missing_model(tmp_path, image, capsys):
    assert main(["chat", str(tmp_path / "no-such-model"), "--image", str(image), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "does not exist", "no-such-model")


def test_chat_model_that_is_not_a_checkpoint(tmp_path, image, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["chat", str(tmp_path / "empty"), "--image", str(image), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "config.json")


def test_chat_missing_image(tiny_checkpoint, tmp_path, capsys):
    assert main(["chat", str(tiny_checkpoint), "--image", str(tmp_path / "nope.png"), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "nope.png", "does not exist")


def test_chat_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a picture")
    assert main(["chat", str(tiny_checkpoint), "--image", str(bad), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "bad.png", "cannot read image")


def test_chat_truncated_image(tiny_checkpoint, image, tmp_path, capsys):
    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[:60])
    assert main(["chat", str(tiny_checkpoint), "--image", str(cut), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "cut.png")


def test_chat_image_is_a_folder(tiny_checkpoint, tmp_path, capsys):
    assert main(["chat", str(tiny_checkpoint), "--image", str(tmp_path), "q"]) == 1
    assert_one_clear_error(capsys, "chat", "not a file")


def test_chat_bad_options(tiny_checkpoint, image, capsys):
    assert main(["chat", str(tiny_checkpoint), "--image", str(image), "--max-new-tokens", "0", "q"]) == 1
    assert_one_clear_error(capsys, "chat", "--max-new-tokens")
    assert main(["chat", str(tiny_checkpoint), "--image", str(image), "--temperature", "-1", "q"]) == 1
    assert_one_clear_error(capsys, "chat", "--temperature")
    assert main(["chat", str(tiny_checkpoint), "--image", str(image), "<image>\nq"]) == 1
    assert_one_clear_error(capsys, "chat", "<image>")
    for value in ("nan", "inf"):  # NaN used to mean greedy
        assert main(["chat", str(tiny_checkpoint), "--image", str(image), "--temperature", value, "q"]) == 1
        assert_one_clear_error(capsys, "chat", "--temperature", value)
    for question in ("", "  \n "):  # used to be answered
        assert main(["chat", str(tiny_checkpoint), "--image", str(image), question]) == 1
        assert_one_clear_error(capsys, "chat", "question is empty")


def test_chat_with_a_prompt_past_the_context_says_so(tiny_checkpoint, image, capsys):
    # used to print an empty answer and exit 0; the tiny model's context is 4096 positions
    long_question = "t30 " * 5000
    assert main(["chat", str(tiny_checkpoint), "--image", str(image), long_question]) == 1
    assert_one_clear_error(capsys, "chat", "tokens (images included)", "context is 4096", "max_position_embeddings")


def test_debug_shows_the_traceback(tmp_path, image):
    from llava_manager.chat import ImageError

    with pytest.raises(ImageError):
        main(["--debug", "chat", str(tmp_path), "--image", str(tmp_path / "nope.png"), "q"])
    with pytest.raises(ImageError):  # also after the subcommand
        main(["chat", "--debug", str(tmp_path), "--image", str(tmp_path / "nope.png"), "q"])


# ---- demo: bad input ---------------------------------------------------------------------------------------
def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "1"]) == 1
    assert_one_clear_error(capsys, "demo", "not empty")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_bad_numbers(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--steps", "0"]) == 1
    assert_one_clear_error(capsys, "demo", "--steps")
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--heldout-images", "0"]) == 1
    assert_one_clear_error(capsys, "demo", "--heldout-images")
    assert not (tmp_path / "d").exists()


def test_demo_output_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--output-dir", str(tmp_path / "file")]) == 1
    assert_one_clear_error(capsys, "demo", "is a file")


# ---- the installed console script, as a user runs it ---------------------------------------------------------
def test_console_script_error_is_two_lines_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_manager.cli",
            "chat",
            str(tmp_path / "missing-model"),
            "--image",
            str(tmp_path / "missing.png"),
            "What is it?",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert "Traceback" not in result.stderr
    assert lines == [
        (
            f"llava-manager chat: error: model folder {str(tmp_path / 'missing-model')!r} does not exist; pass a "
            "checkpoint folder (e.g. outputs/demo/manager after `make demo`) or a Hub repo id like "
            "LooperXX/LLaVA-OV-Manager"
        ),
        "(run with --debug for the full traceback)",
    ]
