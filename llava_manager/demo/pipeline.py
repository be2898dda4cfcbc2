"""The demo, end to end on a small random LLaVA-OV, on CPU, with nothing downloaded.

1. draw a synthetic shapes dataset (train + held-out images; `shapes.py`), or with `video=True` clips of a
   shape that moves or changes colour (`clips.py`);
2. train with the real entry point (`llava_manager.train.main.train`) on the shipped `demo` recipe:
   a small model is built from `configs/models/demo.json` with random weights, patched with Managers,
   trained with the HF Trainer and DeepSpeed ZeRO-2, and saved in HF format. Each training run is a
   process of its own (`worker.py`), its output in `<run>/train.log`; the demo prints its own progress;
3. reload the saved model with `llava_manager.from_pretrained`, answer one held-out question, and score
   every held-out question (exact match on the one-word answer);
4. draw the learned Manager weights (`inspect_weights.py`);
5. with `compare=True`, train the unpatched model on the same data, steps and seed, score it the same way,
   and draw both loss curves in one PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DemoError, ManagerError  # noqa: F401  (DemoError: re-exported)
from .clips import FRAMES, VIDEO_CHANCE, VIDEO_QUESTIONS, write_clip_dataset
from .shapes import COLORS, POSITIONS, QUESTIONS, SHAPES, DemoData, write_demo_dataset

RECIPE = "demo"  # configs/recipes/demo.yaml: model, Managers, learning rates, batch size
DEFAULT_STEPS = 400
# clips: "moves" and the end colour are learned in ~400 steps, left vs right (space x time) only after ~1000-1400
DEFAULT_VIDEO_STEPS = 1600
DEFAULT_TRAIN_IMAGES = 480
DEFAULT_HELDOUT_IMAGES = 48
SUMMARY = "demo_summary.json"
MARKER = ".llava_manager_demo"
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), **VIDEO_CHANCE}
ALL_QUESTIONS = {**QUESTIONS, **VIDEO_QUESTIONS}
BASELINE_PARTS = ["projector", "vision_tower", "language_model"]
# set by launchers / a previous in-process run; a training worker must start its own one-process group
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class HeldoutScore:
    """Exact-match accuracy on the held-out questions, overall and per question type, with every answer."""

    correct: int
    total: int
    by_type: dict[str, float]
    answers: list[dict]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    def line(self) -> str:
        parts = ", ".join(f"{kind} {_percent(value)}" for kind, value in self.by_type.items())
        return f"{_percent(self.accuracy)} ({self.correct}/{self.total}; {parts})"


@dataclass
class RunResult:
    """One trained model of the demo: where it is, how its loss went, how it scored on held-out questions."""

    name: str
    model_dir: Path
    log_file: Path
    losses: list[tuple[int, float]]
    train_seconds: float
    score: HeldoutScore | None = None

    def to_dict(self) -> dict:
        score = self.score
        return {
            "model_dir": str(self.model_dir),
            "train_log": str(self.log_file),
            "train_seconds": round(self.train_seconds, 1),
            "first_loss": self.losses[0][1] if self.losses else None,
            "last_loss": self.losses[-1][1] if self.losses else None,
            "losses": self.losses,
            "heldout_accuracy": score.accuracy if score else None,
            "heldout_correct": score.correct if score else None,
            "heldout_total": score.total if score else None,
            "heldout_accuracy_by_type": score.by_type if score else None,
        }


@dataclass
class DemoResult:
    output_dir: Path
    data: DemoData
    runs: dict[str, RunResult]
    example: dict
    weights_png: Path
    weights_table: str
    loss_png: Path | None
    summary_json: Path
    seconds: float


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _prepare_output(output_dir: Path) -> None:
    """Create `output_dir`, or clear a previous demo's output there; refuse a folder holding anything else."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise DemoError(f"--output-dir {output_dir} is a file; pick a folder")
        entries = list(output_dir.iterdir())
        if entries and not (output_dir / MARKER).exists():
            raise DemoError(
                f"--output-dir {output_dir} is not empty and holds no earlier demo output; pick a new or empty folder"
            )
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MARKER).write_text("this folder is written by `llava-manager demo`\n")


@contextlib.contextmanager
def _one_thread():
    """The tiny model's matrices are too small to split: one thread is faster than two, and much faster on a busy
    machine (measured: 0.1 s against 0.25-0.4 s per training step). Restores the caller's setting afterwards."""
    import torch

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- training --------------------------------------------------------------------------------------------
def demo_overrides(
    data: DemoData, run_dir: Path, steps: int, seed: int, managers: bool, extra: dict | None = None
) -> dict:
    """Overrides of the shipped `demo` recipe: the demo's data, steps, seed and output folder (and `extra`)."""
    media = (
        {"video_folder": str(data.video_folder), "frames_upbound": FRAMES, "check_videos": "open"}
        if data.is_video
        else {"image_folder": str(data.image_folder)}
    )
    overrides = {
        "data_path": str(data.train_json),
        **media,
        "output_dir": str(run_dir),
        "max_steps": steps,
        "logging_steps": 1,
        "save_steps": 0,
        "seed": seed,
        "training_args.disable_tqdm": True,
    }
    overrides.update(extra or {})
    if not managers:  # the same recipe without Managers: the unpatched LLaVA-OV
        overrides.update({"manager": None, "train_parts": BASELINE_PARTS})
    return overrides


def _worker_environment(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES and not k.startswith("ACCELERATE_")}
    # the recipe's cpu_threads, at most one per core; also keeps accelerate from changing it
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(threads or 1, os.cpu_count() or 1))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the demo never downloads anything
    source_root = str(Path(__file__).resolve().parents[2])  # this llava_manager, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    return env


def _last_line(log_file: Path) -> str:
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def train_run(name: str, overrides: dict, say: Callable[[str], None]) -> RunResult:
    """Train one model through `llava_manager.train` in a process of its own, showing its progress."""
    from ..train.recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides)  # bad overrides fail here, before a process starts
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file, progress_file = run_dir / "train.log", run_dir / "progress.jsonl"
    progress_file.unlink(missing_ok=True)
    every = max(1, recipe.max_steps // 6)
    command = [sys.executable, "-m", "llava_manager.demo.worker", RECIPE, json.dumps(overrides), str(progress_file)]
    start = time.perf_counter()
    losses: list[tuple[int, float]] = []

    def relay() -> None:
        if not progress_file.exists():
            return
        for line in progress_file.read_text().splitlines()[len(losses) :]:
            entry = json.loads(line)
            if "step" not in entry:
                continue
            losses.append((entry["step"], entry["loss"]))
            step = entry["step"]
            if step == 1 or step % every == 0 or step == recipe.max_steps:
                say(
                    f"    step {step:4d}/{recipe.max_steps}  loss {entry['loss']:.3f}  ({time.perf_counter() - start:.0f} s)"
                )

    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_worker_environment(recipe.cpu_threads),
            start_new_session=True,
        )
        try:
            while process.poll() is None:
                time.sleep(0.25)
                relay()
        except BaseException:  # Ctrl-C, or the caller's error: take the whole worker down with us
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    relay()
    if process.returncode != 0:
        raise DemoError(f"training the {name} model failed: {_last_line(log_file)} (full log: {log_file})")
    return RunResult(name, run_dir, log_file, losses, time.perf_counter() - start)


# ---- scoring -------------------------------------------------------------------------------------------
def load_trained(model_dir: Path):
    """Reload a saved model the way users do (`llava_manager.from_pretrained`), without a progress bar."""
    import torch
    from transformers.utils import logging

    from llava_manager import from_pretrained

    bars_were_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model, processor = from_pretrained(str(model_dir), dtype=torch.float32)
    finally:
        if bars_were_on:
            logging.enable_progress_bar()
    return model.eval(), processor


def normalise(answer: str) -> str:
    """The first word of an answer, lower case, without punctuation ("Red." -> "red")."""
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in answer.lower()).split()
    return words[0] if words else ""


def score(model, processor, data: DemoData) -> HeldoutScore:
    """Greedy answers to every held-out question; exact match of the first word with the expected answer."""
    from ..chat import ask_batch, load_images, load_video

    samples = data.heldout_samples()
    cache: dict[Path, list] = {}
    items = []
    for sample in samples:
        path = data.media_path(sample)
        if path not in cache:
            cache[path] = [load_video(path, FRAMES)] if data.is_video else load_images([path])
        question = sample["conversations"][0]["value"].replace("<image>\n", "")
        items.append(([], question, cache[path]) if data.is_video else (cache[path], question))
    answers = ask_batch(model, processor, items, max_new_tokens=4)
    records, by_type = [], {}
    for sample, answer in zip(samples, answers):
        expected = sample["conversations"][1]["value"]
        ok = normalise(answer) == expected
        records.append(
            {
                "id": sample["id"],
                **({"video": sample["video"]} if data.is_video else {"image": sample["image"]}),
                "type": sample["question_type"],
                "expected": expected,
                "answer": answer,
                "correct": ok,
            }
        )
        by_type.setdefault(sample["question_type"], []).append(ok)
    correct = sum(record["correct"] for record in records)
    return HeldoutScore(correct, len(records), {k: sum(v) / len(v) for k, v in by_type.items()}, records)


# ---- the demo --------------------------------------------------------------------------------------------
def run_demo(
    output_dir: str | Path = "outputs/demo",
    *,
    steps: int | None = None,
    compare: bool = False,
    train_images: int = DEFAULT_TRAIN_IMAGES,
    heldout_images: int = DEFAULT_HELDOUT_IMAGES,
    seed: int = 0,
    recipe_overrides: dict | None = None,
    say: Callable[[str], None] | None = None,
    video: bool = False,
) -> DemoResult:
    """Run the demo; returns where everything went and the scores. `say` prints progress (default: stdout).

    Args:
        output_dir (`str` or `Path`, *optional*, defaults to `"outputs/demo"`): created; a previous demo's
            output there is replaced.
        steps (`int`, *optional*): optimizer steps per trained model (batch 8, `demo` recipe); defaults to
            `DEFAULT_STEPS` (400) for images, `DEFAULT_VIDEO_STEPS` (1600) with `video`.
        compare (`bool`, *optional*, defaults to `False`): also train the unpatched model and plot both losses.
        train_images (`int`), heldout_images (`int`), seed (`int`): the synthetic data (clips with `video`).
        video (`bool`, *optional*, defaults to `False`): train on clips (`clips.py`) and ask about motion and the
            colour at the end, instead of images.
        recipe_overrides (`dict`, *optional*): more `demo` recipe overrides (`{"learning_rates.manager": 0.02}`),
            applied to both runs.
    """
    if steps is None:
        steps = DEFAULT_VIDEO_STEPS if video else DEFAULT_STEPS
    if steps < 1:
        raise DemoError(f"--steps {steps}: train at least one step")
    started = time.perf_counter()
    say = say or (lambda line: print(line, flush=True))
    output_dir = Path(output_dir).resolve()
    _prepare_output(output_dir)
    stages = _Stages(6 if compare else 5, say)

    if video:
        stages.next(
            f"drawing the synthetic clips ({train_images} training clips, {heldout_images} held-out clips x 2-3 "
            f"questions; {FRAMES} frames each: a shape sliding left or right, or changing colour halfway)"
        )
        data = write_clip_dataset(output_dir / "data", train_images, heldout_images, seed=seed)
    else:
        stages.next(
            f"drawing the synthetic shapes data ({train_images} training images, "
            f"{heldout_images} held-out images x {len(QUESTIONS)} questions)"
        )
        data = write_demo_dataset(output_dir / "data", train_images, heldout_images, seed=seed)
    say(f"    {data.train_json}, {data.heldout_json}")

    run, model = _train_and_score_managers(output_dir, data, steps, seed, recipe_overrides, stages)
    example = random.Random(seed).choice(run.score.answers)
    chance = _show_example_and_accuracy(run, data, example, say)
    weights, table, weights_png = _draw_weights(model, output_dir, steps, stages)
    del model
    runs = {"manager": run}
    loss_png = None
    if compare:
        runs["baseline"], loss_png = _compare_baseline(
            output_dir, data, steps, seed, recipe_overrides, run, chance, stages
        )

    seconds = time.perf_counter() - started
    summary = {
        "steps": steps,
        "seed": seed,
        "media": "video" if video else "image",
        "train_images": train_images,
        "heldout_images": heldout_images,
        "heldout_questions": run.score.total,
        "chance_accuracy": chance,
        "data": str(data.folder),
        "manager_weights_png": str(weights_png),
        "loss_curves_png": str(loss_png) if loss_png else None,
        "manager_weights": {"rows": weights.rows, "vision_layers": weights.vision_layers, "mean_abs": weights.values},
        "example": example,
        "runs": {name: r.to_dict() for name, r in runs.items()},
        "answers": {name: r.score.answers for name, r in runs.items()},
        "seconds": round(seconds, 1),
    }
    summary_json = output_dir / SUMMARY
    summary_json.write_text(json.dumps(summary, indent=1))
    result = DemoResult(output_dir, data, runs, example, weights_png, table, loss_png, summary_json, seconds)
    _say_written(result, stages)
    return result


class _Stages:
    """Numbered progress lines: `[2/5] training ...`."""

    def __init__(self, total: int, say: Callable[[str], None]):
        self.total, self.done, self.say = total, 0, say

    def next(self, line: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {line}")


def _train_and_score_managers(output_dir, data, steps, seed, recipe_overrides, stages):
    """Train the patched tiny model, reload it and score the held-out questions; returns (run, reloaded model)."""
    from ..train.recipe import load_recipe

    say = stages.say
    overrides = demo_overrides(data, output_dir / "manager", steps, seed, managers=True, extra=recipe_overrides)
    recipe = load_recipe(RECIPE, overrides)
    manager = dict(recipe.manager or {})
    stages.next(
        f"training: a small random LLaVA-OV from configs/models/{recipe.model_config}.json, patched with "
        f"{manager.get('manager_type', 'static')} Managers (injection={manager.get('injection', 'llm')}, "
        f"LLM layers {manager.get('llm_layers', 'default')}); recipe {RECIPE}, DeepSpeed {recipe.deepspeed}, "
        f"{steps} steps of {recipe.per_device_train_batch_size}"
    )
    run = train_run("Manager", overrides, say)
    say(
        f"    loss {run.losses[0][1]:.3f} -> {run.losses[-1][1]:.3f} in {run.train_seconds:.0f} s; saved to {run.model_dir}"
    )
    stages.next(f"reloading {run.model_dir} with llava_manager.from_pretrained and asking held-out questions")
    with _one_thread():
        model, processor = load_trained(run.model_dir)
        resolved = model.config.manager
        say(
            f"    reloaded a {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters; "
            f"Managers before LLM layers {resolved['llm_layers']} mixing SigLIP hidden_states {resolved['vision_layers']})"
        )
        run.score = score(model, processor, data)
    return run, model


def _show_example_and_accuracy(run, data, example, say) -> float:
    """Print one held-out question with its answer, and the accuracy; returns the chance accuracy."""
    say(f"    held-out {'clip' if data.is_video else 'image'} {data.media_path(example)}")
    say(f"    Q: {ALL_QUESTIONS[example['type']]}")
    verdict = "correct" if example["correct"] else "wrong"
    say(f"    A: {example['answer']!r}  (expected {example['expected']!r}: {verdict})")
    chance = sum(CHANCE[r["type"]] for r in run.score.answers) / run.score.total
    say(f"    held-out accuracy: {run.score.line()}; chance would be {_percent(chance)}")
    return chance


def _draw_weights(model, output_dir, steps, stages):
    """The learned Manager weights as a table (printed) and a heatmap PNG; returns (weights, table, png)."""
    from ..inspect_weights import format_table, manager_weights, plot_manager_weights

    stages.next("drawing the learned Manager weights")
    weights = manager_weights(model)
    table = format_table(weights)
    weights_png = plot_manager_weights(
        weights, output_dir / "manager_weights.png", title=f"learned Manager weights after {steps} steps (demo)"
    )
    for line in table.splitlines():
        stages.say("    " + line)
    return weights, table, weights_png


def _compare_baseline(output_dir, data, steps, seed, recipe_overrides, run, chance, stages):
    """--compare: train and score the unpatched model the same way; returns (its run, the loss-curves PNG)."""
    from .plots import plot_loss_curves

    say = stages.say
    stages.next("--compare: training the unpatched LLaVA-OV (same data, steps and seed, no Managers)")
    base_overrides = demo_overrides(data, output_dir / "baseline", steps, seed, managers=False, extra=recipe_overrides)
    baseline = train_run("baseline", base_overrides, say)
    with _one_thread():
        base_model, base_processor = load_trained(baseline.model_dir)
        baseline.score = score(base_model, base_processor, data)
    del base_model
    say(f"    loss {baseline.losses[0][1]:.3f} -> {baseline.losses[-1][1]:.3f} in {baseline.train_seconds:.0f} s")
    say(f"    held-out accuracy without Managers: {baseline.score.line()} (with Managers: {run.score.line()})")
    loss_png = plot_loss_curves(
        {"with Managers": run.losses, "without Managers (baseline)": baseline.losses},
        output_dir / "loss_curves.png",
        title=f"tiny random LLaVA-OV on synthetic shapes, same data, steps and seed; held-out accuracy "
        f"{_percent(run.score.accuracy)} with Managers, {_percent(baseline.score.accuracy)} without "
        f"(chance {_percent(chance)})",
    )
    return baseline, loss_png


def _media_flag(data: DemoData) -> str:
    return f"--frames {FRAMES} --video" if data.is_video else "--image"


def _say_written(result: DemoResult, stages: _Stages) -> None:
    """The closing lines: the time, every file written, and commands to try next."""
    say, runs, run, data, example = stages.say, result.runs, result.runs["manager"], result.data, result.example
    stages.next(f"done in {result.seconds:.0f} s. Written:")
    say(f"    data (train.json, heldout.json, {'videos/' if data.is_video else 'images/'})  {data.folder}")
    say(f"    trained model with Managers (HF format)   {run.model_dir}")
    if "baseline" in runs:
        say(f"    trained model without Managers            {runs['baseline'].model_dir}")
        say(f"    loss curves (PNG)                         {result.loss_png}")
    say(f"    Manager weights heatmap (PNG)             {result.weights_png}")
    say(f"    training logs                             {', '.join(str(r.log_file) for r in runs.values())}")
    say(f"    summary with every held-out answer        {result.summary_json}")
    say(
        f"try: llava-manager chat {run.model_dir} {_media_flag(data)} {data.media_path(example)} "
        f'"{ALL_QUESTIONS[example["type"]]}"'
    )
    say(f"     llava-manager inspect {run.model_dir} --out weights.png")
