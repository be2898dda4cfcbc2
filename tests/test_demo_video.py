"""`llava-manager demo --video`: the synthetic clips show what their answers say, and the pipeline runs on them at a
small step count (the full command is `slow`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_manager.cli import main
from llava_manager.demo import run_demo
from llava_manager.demo.clips import CLIP_SIZE, FRAMES, VIDEO_QUESTIONS, write_clip_dataset
from llava_manager.demo.pipeline import normalise
from llava_manager.media import load_video
from llava_manager.testing.shapes import COLORS
from llava_manager.testing.tiny import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shape_pixels(frame: np.ndarray) -> np.ndarray:
    """(N, 3) colours and the mask of the pixels that are not the grey background."""
    spread = frame.max(axis=2).astype(int) - frame.min(axis=2).astype(int)
    return spread > 60  # the background is grey (equal channels); every shape colour is saturated


def _seen(video: np.ndarray) -> tuple[str, str, str]:
    """(motion, start colour, end colour) read off the frames: where the shape's pixels are and their colour."""
    masks = [_shape_pixels(frame) for frame in video]
    centres = [np.nonzero(mask)[1].mean() for mask in masks]
    motion = "still" if abs(centres[-1] - centres[0]) < 1 else ("right" if centres[-1] > centres[0] else "left")

    def colour(frame, mask):
        mean = frame[mask].mean(axis=0)
        return min(COLORS, key=lambda name: np.abs(np.array(COLORS[name]) - mean).sum())

    return motion, colour(video[0], masks[0]), colour(video[-1], masks[-1])


def test_the_clips_show_what_their_answers_say(tmp_path):
    """Read every held-out clip's motion and colours off its pixels and compare with the written answers."""
    data = write_clip_dataset(tmp_path, n_train=12, n_heldout=18, seed=2)
    by_clip: dict[str, dict] = {}
    for sample in data.heldout_samples():
        by_clip.setdefault(sample["video"], {})[sample["question_type"]] = sample["conversations"][1]["value"]
    assert len(by_clip) == 18
    kinds = set()
    for name, answers in by_clip.items():
        video = load_video(data.video_folder / name, num_frames=100)
        assert video.shape == (FRAMES, CLIP_SIZE[1], CLIP_SIZE[0], 3)
        motion, start, end = _seen(video)
        kinds.add(motion)
        assert answers["moves"] == ("no" if motion == "still" else "yes"), name
        assert answers.get("direction") == (None if motion == "still" else motion), name
        assert answers["end_color"] == end, name
        assert (start != end) == (motion == "still"), name  # still clips change colour halfway, moving ones do not
    assert kinds == {"left", "right", "still"}


def test_clip_data_loads_as_training_data_with_one_token_answers(tmp_path):
    from llava_manager.train.data import load_samples

    data = write_clip_dataset(tmp_path, n_train=9, n_heldout=3, seed=0)
    loaded = load_samples(data.train_json, None, video_folder=data.video_folder, check_videos="open", video_frames=6)
    assert len(loaded.samples) == 9 and not loaded.skipped
    assert all(s.video and not s.images for s in loaded.samples)
    train = {s["id"] for s in json.loads(data.train_json.read_text())}
    assert not train & {s["video"] for s in data.heldout_samples()}
    tokenizer = tiny_tokenizer()
    for record in json.loads(data.train_json.read_text()):
        asked = {t["value"].replace("<image>\n", "") for t in record["conversations"][::2]}
        assert asked in ({VIDEO_QUESTIONS["moves"], VIDEO_QUESTIONS["end_color"]}, set(VIDEO_QUESTIONS.values()))
        assert record["conversations"][0]["value"].startswith("<image>\n")  # LLaVA-Video's mark for the video
        for turn in record["conversations"][1::2]:
            assert len(tokenizer.tokenize(turn["value"])) == 1  # one-word answers: one token


@pytest.fixture(scope="module")
def small_video_demo(tmp_path_factory):
    lines: list[str] = []
    result = run_demo(
        tmp_path_factory.mktemp("demo") / "out",
        steps=3,
        train_images=6,
        heldout_images=3,
        say=lines.append,
        video=True,
    )
    return result, lines


def test_the_video_demo_trains_on_clips_and_scores_every_question(small_video_demo):
    result, lines = small_video_demo
    summary = json.loads(result.summary_json.read_text())
    assert summary["media"] == "video"
    run = summary["runs"]["manager"]
    assert [step for step, _ in run["losses"]] == [1, 2, 3]
    questions = result.data.heldout_samples()
    assert run["heldout_total"] == len(questions) and all("video" in a for a in summary["answers"]["manager"])
    for answer in summary["answers"]["manager"]:
        assert answer["correct"] == (normalise(answer["answer"]) == answer["expected"])
    recipe = (result.output_dir / "manager" / "recipe.yaml").read_text()
    assert "frames_upbound: 6" in recipe and "video_folder:" in recipe
    printed = "\n".join(lines)
    assert "synthetic clips" in printed and "held-out clip" in printed and "--video" in printed


def test_chat_answers_about_a_held_out_clip(small_video_demo, capsys):
    result, _ = small_video_demo
    clip = result.data.video_folder / result.example["video"]
    question = VIDEO_QUESTIONS[result.example["type"]]
    command = ["chat", str(result.output_dir / "manager"), "--video", str(clip), "--frames", str(FRAMES), question]
    assert main(command + ["--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()  # the streamed answer (empty if the 3-step model says nothing)
    assert normalise(answer) == normalise(result.example["answer"])  # greedy: what the scoring saw


@pytest.mark.slow
def test_video_demo_command_end_to_end(tmp_path):
    """`llava-manager demo --video` as a user runs it (fewer steps than the default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.pop("OMP_NUM_THREADS", None)
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "llava_manager.cli", "demo", "--video", "--output-dir", str(out), "--steps", "40"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout and "Traceback" not in result.stdout + result.stderr
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["runs"]["manager"]["last_loss"] < summary["runs"]["manager"]["first_loss"]
