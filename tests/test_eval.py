"""lmms-eval integration (llava_manager/eval, patches/lmms_eval, tests/fixtures/eval_task).

The prompt tests need nothing; the rest need lmms-eval (`pip install -e ".[eval]"`, which
`make test` does) and skip with that reason where it is absent. All offline, tiny models only.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import pytest

from llava_manager.eval.prompt import build_prompt, get_template, with_image_placeholders

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_TASK = ROOT / "tests" / "fixtures" / "eval_task"
VIDEO_TASK = FIXTURE_TASK / "clips"
PATCHES = ROOT / "patches" / "lmms_eval"

needs_lmms_eval = pytest.mark.skipif(
    find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (optional extra): pip install -e '.[eval]'",
)

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


# ---- the authors' qwen_1_5 prompt (pure string code) --------------------------------------------


def test_qwen_1_5_prompt_matches_llava_next_chatml():
    prompt = build_prompt("What is shown?", num_images=1, conv_template="qwen_1_5")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert build_prompt("What is shown?", 1, "qwen_2") == prompt


def test_image_placeholders_like_the_authors_model():
    assert with_image_placeholders("Q", 2) == "<image> <image>\nQ"
    assert with_image_placeholders("Q", 0) == "Q"  # text-only: no placeholder
    assert with_image_placeholders("Look: <image> Q", 1) == "Look: <image> Q"  # task placed it


def test_conversational_context_and_unknown_template():
    turns = json.dumps(
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Q"}]
    )
    prompt = build_prompt(turns, num_images=0)
    assert prompt.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="qwen_1_5"):
        get_template("vicuna_v1")


# ---- a tiny random Manager model on disk ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_manager_dir(tmp_path_factory):
    """A patched tiny LLaVA-OV saved in HF format with its processor. The LM head is untied and
    random so that greedy answers vary (a tied tiny model repeats its last input token)."""
    import torch

    from llava_manager import ManagerConfig, patch_llava
    from llava_manager.testing.tiny import tiny_model, tiny_processor

    model = tiny_model(seed=1)
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    model = patch_llava(model, ManagerConfig())
    path = tmp_path_factory.mktemp("tiny_manager")
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


def _fixture_requests(docs, gen_kwargs):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    def doc_to_visual(doc):
        return [Image.open(FIXTURE_TASK / path) for path in doc["images"]]

    return [
        Instance(
            "generate_until",
            (doc["question"], dict(gen_kwargs), doc_to_visual, index, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": index, "repeats": 1},
        )
        for index, doc in enumerate(docs)
    ]


# ---- registration --------------------------------------------------------------------------------


@needs_lmms_eval
def test_launcher_registration_makes_get_model_return_our_class():
    from lmms_eval.models import get_model

    from llava_manager.eval import register
    from llava_manager.eval.model import LlavaManager

    register()
    assert get_model("llava_manager") is LlavaManager
    assert LlavaManager.is_simple is True


@needs_lmms_eval
def test_entry_point_exposes_the_model_to_lmms_eval():
    """`lmms_eval.models.get_model("llava_manager")` through the installed entry point alone."""
    declared = "lmms_eval.models" in (ROOT / "setup.cfg").read_text()
    installed = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "llava_manager"]
    if declared and not installed:
        pytest.skip(
            "setup.cfg declares the lmms_eval.models entry point but this install predates it: pip install -e . --no-deps"
        )
    assert installed, (
        "setup.cfg must declare [options.entry_points] lmms_eval.models = llava_manager = llava_manager.eval.manifest:MANIFEST"
    )
    code = "from lmms_eval.models import get_model; c = get_model('llava_manager'); print(c.__module__ + '.' + c.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env(), check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "llava_manager.eval.model.LlavaManager"


# ---- the model in process ------------------------------------------------------------------------


@needs_lmms_eval
def test_batched_generation_equals_one_by_one(tiny_manager_dir):
    from llava_manager.eval.model import LlavaManager

    docs = json.loads((FIXTURE_TASK / "questions.json").read_text())
    answers = {}
    for batch_size in (1, 3):
        lm = LlavaManager(
            pretrained=str(tiny_manager_dir),
            batch_size=batch_size,
            conv_template="qwen_1_5",
            model_name="llava_qwen_manager",
        )
        lm.task_dict = {"tiny": {"test": docs}}
        results = lm.generate_until(
            _fixture_requests(docs, {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0.2, "do_sample": False})
        )
        answers[batch_size] = [(result.text, result.token_counts.output_tokens) for result in results]
    assert answers[1] == answers[3]  # left padding changes nothing, in the original order
    assert any(text for text, _ in answers[1]), "the tiny model should say something"
    assert all(0 < count <= 5 for _, count in answers[1])

    # only the new tokens are decoded: no prompt text comes back
    assert not any("assistant" in text and "system" in text for text, _ in answers[1])


@needs_lmms_eval
def test_answers_are_cut_to_the_context_counted_and_an_over_long_prompt_is_an_error(tiny_manager_dir, monkeypatch):
    from llava_manager.errors import RequestError
    from llava_manager.eval.model import LlavaManager

    docs = json.loads((FIXTURE_TASK / "questions.json").read_text())[:2]
    lm = LlavaManager(pretrained=str(tiny_manager_dir), batch_size=1, conv_template="qwen_1_5")
    lm.task_dict = {"tiny": {"test": docs}}
    kwargs = {"max_new_tokens": 50, "until": ["\n\n"], "do_sample": False}
    lengths = []  # each batch's prompt length, images included, as the model sees it
    make_inputs = lm._inputs

    def recording_inputs(prompts, images, videos=None):
        inputs = make_inputs(prompts, images, videos)
        lengths.append(int(inputs["attention_mask"].sum(dim=1).max()))
        return inputs

    monkeypatch.setattr(lm, "_inputs", recording_inputs)
    lm.generate_until(_fixture_requests(docs, kwargs))
    assert lm.cut_answers == 0  # the tiny model's 4096 positions leave room for 50 new tokens
    limit = max(lengths) + 2
    monkeypatch.setattr(lm.model.config.text_config, "max_position_embeddings", limit)
    lengths.clear()
    results = lm.generate_until(_fixture_requests(docs, kwargs))
    assert lm.cut_answers == len(docs)  # both answers were cut short, and counted
    assert all(0 < result.token_counts.output_tokens <= limit - min(lengths) for result in results)
    monkeypatch.setattr(lm.model.config.text_config, "max_position_embeddings", min(lengths))
    with pytest.raises(RequestError, match=r"the prompt of tiny doc \d+ is \d+ tokens \(images included\)"):
        lm.generate_until(_fixture_requests(docs, kwargs))


@needs_lmms_eval
def test_video_docs_answer_as_generate_does_on_the_frames_lmms_eval_samples(tiny_manager_dir):
    """Video paths (MP4 and a frame folder; one doc with an image too) and `sample_frames` frame lists: the answer
    equals generate() on a prompt written out here and frames picked with lmms-eval's llava_onevision rule."""
    import numpy as np
    import torch
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from llava_manager.eval.model import LlavaManager
    from llava_manager.media import load_video

    pytest.importorskip("av")
    docs = json.loads((VIDEO_TASK / "questions.json").read_text())
    lm = LlavaManager(pretrained=str(tiny_manager_dir), batch_size=2, max_frames_num=4)
    lm.task_dict = {"clips": {"test": docs}, "frames": {"test": docs}}
    kwargs = {"max_new_tokens": 5, "until": ["\n\n"], "do_sample": False}
    sys.path.insert(0, str(VIDEO_TASK))
    try:
        from utils import doc_to_visual
    finally:
        sys.path.remove(str(VIDEO_TASK))

    def as_frames(doc):  # a "sample_frames" task: the clip's every frame as an image
        return [Image.fromarray(frame) for frame in load_video(VIDEO_TASK / doc["video"], num_frames=1000)]

    requests = [
        Instance("generate_until", (doc["question"], dict(kwargs), visual, index, task, "test"), idx=0, metadata=meta)
        for task, visual, extra in (("clips", doc_to_visual, {}), ("frames", as_frames, {"task_type": "video", "sample_frames": 3}))
        for index, doc in enumerate(docs)
        for meta in [{"task": task, "doc_id": index, "repeats": 1, **extra}]
    ]  # fmt: skip
    answers = [result.text for result in lm.generate_until(requests)]

    processor, model = lm.processor, lm.model
    for request, answer in zip(requests, answers):
        question, _, _, index, task, _ = request.args
        doc = docs[index]
        every = load_video(VIDEO_TASK / doc["video"], num_frames=1000)  # all frames, in order
        count = 4 if task == "clips" else 3
        video = every[np.linspace(0, len(every) - 1, count, dtype=int)]  # lmms-eval: exact count, truncated
        image = [Image.open(VIDEO_TASK / doc["image"]).convert("RGB")] if doc.get("image") and task == "clips" else []
        seen_images, seen_videos = lm._visuals(request.args[2], task, "test", index, request.metadata)
        assert len(seen_images) == len(image) and len(seen_videos) == 1
        assert np.array_equal(seen_videos[0], video), (task, index)  # the very frames lmms-eval would pick
        media = "<image> <video>" if image else "<video>"
        prompt = SYSTEM_TURN + f"<|im_start|>user\n{media}\n{question}<|im_end|>\n<|im_start|>assistant\n"
        inputs = processor(text=[prompt], images=image or None, videos=[video], return_tensors="pt")
        assert inputs["pixel_values_videos"].shape[1] == count
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=5,
                do_sample=False,
                eos_token_id=lm._eos_token_ids,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == expected.strip(), (task, index)
    assert any(answers), "the tiny model should say something"


@needs_lmms_eval
def test_an_unreadable_video_names_the_document(tiny_manager_dir, tmp_path):
    from lmms_eval.api.instance import Instance

    from llava_manager.errors import VideoError
    from llava_manager.eval.model import LlavaManager

    (tmp_path / "broken.mp4").write_bytes(b"no video here")
    lm = LlavaManager(pretrained=str(tiny_manager_dir))
    lm.task_dict = {"clips": {"test": [{"q": "Q"}]}}
    args = ("Q", {"max_new_tokens": 2}, lambda doc: [str(tmp_path / "broken.mp4")], 0, "clips", "test")
    request = Instance("generate_until", args, idx=0, metadata={"task": "clips", "doc_id": 0, "repeats": 1})
    with pytest.raises(VideoError, match=r"clips doc 0: cannot decode video .*broken\.mp4"):
        lm.generate_until([request])
    with pytest.raises(ValueError, match="max_frames_num must be >= 1"):
        LlavaManager(pretrained=str(tiny_manager_dir), max_frames_num=0)


@needs_lmms_eval
def test_model_args(tiny_manager_dir):
    from llava_manager.eval.model import LlavaManager

    with pytest.raises(ValueError, match="unknown model args"):
        LlavaManager(pretrained=str(tiny_manager_dir), not_an_option=1)
    with pytest.raises(ValueError, match="conv_template"):
        LlavaManager(pretrained=str(tiny_manager_dir), conv_template="vicuna_v1")
    with pytest.raises(ValueError, match="zero3='maybe': use true or false"):
        LlavaManager(pretrained=str(tiny_manager_dir), zero3="maybe")
    with pytest.raises(ValueError, match="zero3=true partitions the weights; drop device_map"):
        LlavaManager(pretrained=str(tiny_manager_dir), zero3="true", device_map="auto")
    # the authors' llava_onevision args are accepted and ignored
    lm = LlavaManager(
        pretrained=str(tiny_manager_dir),
        conv_template="qwen_1_5",
        model_name="llava_qwen_manager",
        truncate_context=False,
        dtype="float32",
    )
    assert lm.world_size == 1 and lm.rank == 0 and lm.model.dtype.is_floating_point


# ---- lmms-eval end to end, through its CLI --------------------------------------------------------


def _clean_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by conftest for DeepSpeed
        env.pop(key, None)
    for key in [k for k in env if k.startswith("ACCELERATE_")]:  # left by an in-process training run
        env.pop(key)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@needs_lmms_eval
@pytest.mark.slow
def test_lmms_eval_cli_end_to_end_offline(tiny_manager_dir, tmp_path):
    output = tmp_path / "out"
    env = _clean_env()
    env["HF_HOME"] = str(tmp_path / "hf")  # the json builder's cache
    command = [
        sys.executable, "-m", "llava_manager.eval",
        "--model", "llava_manager",
        "--model_args", f"pretrained={tiny_manager_dir},conv_template=qwen_1_5,model_name=llava_qwen_manager,log_every=1",
        "--tasks", "tiny_shapes,tiny_clips",
        "--include_path", str(FIXTURE_TASK),
        "--batch_size", "2",
        "--output_path", str(output),
        "--log_samples",
        "--verbosity", "DEBUG",  # otherwise lmms-eval logs errors and exits 0
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]

    results_files = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    assert len(results_files) == 1, log[-3000:]
    report = json.loads(Path(results_files[0]).read_text())
    assert report["config"]["model"] == "llava_manager"
    assert report["config"]["model_backend"].startswith("llava_manager.eval.model.LlavaManager")
    assert report["n-samples"]["tiny_shapes"]["effective"] == 4
    score = report["results"]["tiny_shapes"]["exact_match,none"]
    assert 0.0 <= score <= 1.0

    samples_files = glob.glob(str(output / "**" / "*_samples_tiny_shapes.jsonl"), recursive=True)
    samples = [json.loads(line) for line in Path(samples_files[0]).read_text().splitlines()]
    assert sorted(sample["doc_id"] for sample in samples) == [0, 1, 2, 3]
    assert all(sample["token_counts"][0]["output_tokens"] > 0 for sample in samples)

    # the logged prompts: system turn, image placeholders before the question, none for text-only
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)  # loguru colours
    prompts = dict(
        re.findall(r"Prompt for tiny_shapes doc (\d+):\n(.*?<\|im_start\|>assistant\n)", plain, flags=re.DOTALL)
    )
    assert set(prompts) == {"0", "1", "2", "3"}, plain[-3000:]
    assert prompts["0"].startswith(SYSTEM_TURN + "<|im_start|>user\n<image>\nWhat color is the circle?")
    assert "<|im_start|>user\n<image> <image>\nHow many images are there?" in prompts["2"]
    assert "<image>" not in prompts["3"] and prompts["3"].startswith(SYSTEM_TURN)

    # the video task: 3 docs answered, `<video>` placeholders (after the image of doc 2)
    assert report["n-samples"]["tiny_clips"]["effective"] == 3
    assert 0.0 <= report["results"]["tiny_clips"]["exact_match,none"] <= 1.0
    clips = dict(
        re.findall(r"Prompt for tiny_clips doc (\d+):\n(.*?<\|im_start\|>assistant\n)", plain, flags=re.DOTALL)
    )
    assert set(clips) == {"0", "1", "2"}, plain[-3000:]
    assert clips["0"].startswith(SYSTEM_TURN + "<|im_start|>user\n<video>\nWhich way does the square move")
    assert "<|im_start|>user\n<image> <video>\nIs the square" in clips["2"]


# ---- patches/lmms_eval: the paper-protocol task overrides ------------------------------------------

# restored keys per override; everything else must equal lmms-eval's own task (drift guard)
OVERRIDES = {
    "mmmu_val_paper.yaml": ("mmmu/mmmu_val.yaml", {"generation_kwargs": {"max_new_tokens": 16}}),
    "mathvista_testmini_paper.yaml": (
        "mathvista/mathvista_testmini_format.yaml",
        {"generation_kwargs": {"max_new_tokens": 1024, "temperature": 0, "num_beams": 1, "do_sample": False}},
    ),
}


def _comparable(value):
    """Functions from two module instances compare by qualified name."""
    if callable(value):
        return f"{value.__module__.rsplit('.', 1)[-1]}.{value.__name__}"
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    return value


@needs_lmms_eval
@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_paper_overrides_equal_lmms_eval_except_restored_keys(name, monkeypatch):
    if name.startswith("mathvista") and find_spec("Levenshtein") is None:
        pytest.skip("MathVista's utils need Levenshtein (in the [eval] extra)")
    monkeypatch.setenv(
        "OPENAI_API_KEY", os.environ.get("OPENAI_API_KEY", "unused-offline")
    )  # judges build clients at import
    import lmms_eval.tasks
    from lmms_eval import utils

    builtin_name, restored = OVERRIDES[name]
    ours = utils.load_yaml_config(str(PATCHES / name), mode="full")
    theirs = utils.load_yaml_config(str(Path(lmms_eval.tasks.__file__).parent / builtin_name), mode="full")
    assert ours["task"] == name.removesuffix(".yaml")
    assert "tag" not in ours  # would add the override to lmms-eval's tag groups
    for key, value in restored.items():
        assert ours[key] == value
    skip = {"task", "tag", *restored}
    assert {k: _comparable(v) for k, v in ours.items() if k not in skip} == {
        k: _comparable(v) for k, v in theirs.items() if k not in skip
    }


@needs_lmms_eval
def test_include_path_indexes_the_overrides_and_the_fixture():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=[str(PATCHES), str(FIXTURE_TASK)], include_defaults=False)
    assert {"mmmu_val_paper", "mathvista_testmini_paper", "tiny_shapes", "tiny_clips"} <= set(manager.all_subtasks)


def _answers(output: Path, task: str = "tiny_shapes") -> dict[int, str]:
    files = glob.glob(str(output / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    assert len(files) == 1, files
    return {(s := json.loads(line))["doc_id"]: s["filtered_resps"] for line in Path(files[0]).read_text().splitlines()}


@needs_lmms_eval
@pytest.mark.slow
@pytest.mark.parametrize("task, limit", [("tiny_shapes", None), ("tiny_shapes", 3), ("tiny_clips", None)])
def test_zero3_evaluation_on_two_processes_answers_as_one_process(tiny_manager_dir, tmp_path, task, limit):
    """`zero3=true` under `torchrun --nproc_per_node 2`: the weights are partitioned, and the ranks stay in step
    where one rank's document has no image (doc 3; limit None), with an odd number of documents (limit 3), and
    where one rank has a video and an image and the other a video (tiny_clips); every answer equals a one-process
    run without ZeRO-3."""
    env = _clean_env()
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    common = [
        "--model", "llava_manager",
        "--tasks", task,
        "--include_path", str(FIXTURE_TASK),
        "--batch_size", "1",
        "--log_samples",
        "--verbosity", "DEBUG",
        *(["--limit", str(limit)] if limit else []),
    ]  # fmt: skip
    rank_logs = tmp_path / "rank_logs"  # one file per rank: lines from both ranks interleave on one pipe
    launch = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("--log-dir", str(rank_logs), "--redirects", "3"),
    ]
    runs = {
        "one": [sys.executable, "-m", "llava_manager.eval", "--model_args", f"pretrained={tiny_manager_dir}"],
        "zero3": [*launch, "-m", "llava_manager.eval", "--model_args", f"pretrained={tiny_manager_dir},zero3=true"],
    }
    logs = {}
    for name, command in runs.items():
        command = [*command, *common, "--output_path", str(tmp_path / name)]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        logs[name] = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
        assert result.returncode == 0, logs[name][-5000:]
    per_rank = {}
    for rank in (0, 1):  # torchrun's per-rank files (--redirects 3): stdout.log and stderr.log
        files = glob.glob(str(rank_logs / "**" / str(rank) / "std*.log"), recursive=True)
        per_rank[rank] = re.sub(r"\x1b\[[0-9;]*m", "", "".join(Path(f).read_text() for f in files))
        assert f"rank {rank}: ZeRO-3, weights partitioned over 2 process(es): True" in per_rank[rank]
    expected = _answers(tmp_path / "one", task)
    assert sorted(expected) == ([0, 1, 2] if limit or task == "tiny_clips" else [0, 1, 2, 3])
    assert _answers(tmp_path / "zero3", task) == expected
    # both ranks made as many generate() calls (lmms-eval may shard 3 documents 2 / 1: the short rank idles)
    made = [re.findall(r"rank \d: (\d+) generate calls, (\d+) idle", per_rank[rank]) for rank in (0, 1)]
    assert all(len(m) == 1 for m in made), made
    assert sum(map(int, made[0][0])) == sum(map(int, made[1][0])) >= 2, made


CATCH_UP_RUNNER = r"""
import os, sys, torch, torch.distributed as dist
from llava_manager.eval.zero3 import catch_up, most_calls
dist.init_process_group("gloo")
rank = dist.get_rank()
mine = 3 if rank == 0 else 1
most = most_calls(mine, torch.device("cpu"))
model_call = lambda: dist.all_reduce(torch.ones(1))  # a collective, as every ZeRO-3 forward is
for _ in range(mine):
    model_call()
idled = catch_up(mine, most, model_call)  # without it rank 0's last two collectives would wait forever
open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w").write(f"{most} {idled}")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_zero3_catch_up_runs_the_missing_calls(tmp_path):
    """The rank with fewer model calls runs idle ones (each a collective here, as a ZeRO-3 forward is) until it has
    made as many as the busiest rank; without them the busy rank's collectives would wait forever."""
    from train_helpers import run_two_processes

    runner = tmp_path / "runner.py"
    runner.write_text(CATCH_UP_RUNNER)
    run_two_processes(runner, [str(tmp_path)], tmp_path, timeout=120, what="catch_up")
    assert (tmp_path / "rank0.txt").read_text() == "3 0"
    assert (tmp_path / "rank1.txt").read_text() == "3 2"
