"""Faults and bad input (issue "Faults and bad input"): each test fails without its fix."""

import json
import os
import socket
from pathlib import Path

import pytest
from hub_stand_in import write_checkpoint

from llava_manager import ManagerConfig, ManagerConfigError, is_patched, patch_llava
from llava_manager.checkpoint.conversion import convert_checkpoint
from llava_manager.checkpoint.source import resolve
from llava_manager.errors import HubError, RecipeError
from llava_manager.testing.tiny import tiny_model


# ---- small ones ------------------------------------------------------------------------------------------
def test_a_mistyped_relative_folder_is_named_as_a_missing_local_folder_too(tmp_path, monkeypatch):
    (tmp_path / "src" / "good").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as caught:
        resolve("srcx/good", local_files_only=True, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert f"no local folder 'srcx/good' in {tmp_path}" in message
    assert "Hub" in message  # and what the Hub lookup said


@pytest.mark.parametrize("value", [{1: 1, 2: 2}, {1, 2}, "12", 3])
def test_layer_lists_must_be_lists(value):
    for field in ("vision_layers", "llm_layers"):
        with pytest.raises(ManagerConfigError, match=f"{field}.*list of layer indices"):
            ManagerConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value", [("llm_layers", "02"), ("vision_layers", {3: 3, 4: 4}), ("manager_type", "bogus"), ("jitter", 2)]
)
def test_fields_changed_after_construction_are_checked_again_at_patch_time(field, value):
    config = ManagerConfig(vision_layers=[1, 2], llm_layers=[0, 1])
    setattr(config, field, value)
    model = tiny_model()
    with pytest.raises(ManagerConfigError, match=field):
        patch_llava(model, config)
    assert not is_patched(model) and type(model).__name__ == "LlavaOnevisionForConditionalGeneration"


def test_no_progress_hides_transformers_own_bars_too(tmp_path, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():  # an earlier test (the chat command) switched them off
        monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    source = write_checkpoint("static_all_anyres", tmp_path / "src" / "checkpoint", tower=True)
    capfd.readouterr()
    convert_checkpoint(source, tmp_path / "out", progress=False)
    err = capfd.readouterr().err
    assert "Writing" not in err and "Loading weights" not in err and "%|" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # switched back on afterwards


# ---- a failed training run -------------------------------------------------------------------------------
@pytest.mark.parametrize("existed", [False, True], ids=["new-folder", "folder-with-files"])
def test_a_training_run_that_fails_mid_run_leaves_nothing_new_behind(tmp_path, existed):
    import json

    from train_helpers import tiny_recipe

    from llava_manager.train.main import train

    recipe = tiny_recipe(tmp_path, "--check_images", "none", "--save_steps", "0")
    data_file = Path(recipe.data_path)
    records = json.loads(data_file.read_text())
    broken = next(r for r in records if isinstance(r.get("image"), str))
    (Path(recipe.image_folder) / broken["image"]).write_bytes(b"not a png")  # found only when its batch loads
    output_dir = Path(recipe.output_dir)
    if existed:
        output_dir.mkdir()
        (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=broken["image"]):
        train(recipe)
    if existed:
        assert sorted(p.name for p in output_dir.iterdir()) == ["notes.txt"]
        assert (output_dir / "notes.txt").read_text() == "mine"
    else:
        assert not output_dir.exists()


def test_checkpoints_of_a_failed_run_are_kept_for_resume(tmp_path):
    from llava_manager.train.saving import remove_what_a_failed_run_created

    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError), remove_what_a_failed_run_created(output_dir):
        (output_dir / "checkpoint-2").mkdir(parents=True)
        (output_dir / "runs").mkdir()
        (output_dir / "trainer_log.txt").write_text("x")
        raise RuntimeError("killed mid-run")
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-2"]


# ---- resume after a kill ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short run that saved checkpoint-2 and checkpoint-4."""
    from train_helpers import tiny_recipe

    from llava_manager.train.main import train

    root = tmp_path_factory.mktemp("run")
    recipe = tiny_recipe(root, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3")
    train(recipe)
    output_dir = Path(recipe.output_dir)
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return root


def _copy_run(finished_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run" / "out"


@pytest.mark.parametrize("damage", ["no_trainer_state", "truncated_optimizer", "truncated_weights"])
def test_resume_skips_a_half_written_newest_checkpoint_and_says_why(finished_run, tmp_path, damage, caplog):
    from llava_manager.train.resume import choose_checkpoint

    output_dir = _copy_run(finished_run, tmp_path)
    newest = output_dir / "checkpoint-4"
    if damage == "no_trainer_state":
        (newest / "trainer_state.json").unlink()
        reason = "no trainer_state.json"
    else:
        name = "optimizer.pt" if damage == "truncated_optimizer" else "model.safetensors"
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
        reason = f"{name} is truncated or corrupt"
    assert choose_checkpoint(output_dir, False) is None
    with caplog.at_level("WARNING", logger="llava_manager.train"):
        assert choose_checkpoint(output_dir, True) == str(output_dir / "checkpoint-2")
    assert f"skipping checkpoint-4: {reason}" in caplog.text and "continuing from" in caplog.text
    with pytest.raises(RecipeError, match=rf"{reason}.*newest complete one there is .*checkpoint-2"):
        choose_checkpoint(output_dir, str(newest))  # asked for by path: a clear error, not a bare one


def test_resume_without_any_complete_checkpoint_is_a_clear_error(finished_run, tmp_path):
    from llava_manager.train.resume import choose_checkpoint

    output_dir = _copy_run(finished_run, tmp_path)
    for folder in output_dir.glob("checkpoint-*"):
        (folder / "trainer_state.json").unlink()
    with pytest.raises(RecipeError, match="no complete checkpoint.*checkpoint-4: no trainer_state.json"):
        choose_checkpoint(output_dir, True)
    with pytest.raises(RecipeError, match="has no checkpoint-N folder"):
        choose_checkpoint(tmp_path / "empty", True)


def test_a_resumed_run_continues_from_the_newest_complete_checkpoint(finished_run, tmp_path, caplog):
    from train_helpers import tiny_recipe

    from llava_manager.train.main import train

    output_dir = _copy_run(finished_run, tmp_path)
    (output_dir / "checkpoint-4" / "trainer_state.json").unlink()  # as a kill during its save leaves it
    recipe = tiny_recipe(
        tmp_path / "run",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--save_total_limit",
        "3",
        "--resume_from_checkpoint",
        "true",
    )
    with caplog.at_level("WARNING", logger="llava_manager.train"):
        result = train(recipe)
    assert f"continuing from {output_dir / 'checkpoint-2'}" in caplog.text
    assert result.trainer.state.global_step == 4
    resaved = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert resaved["global_step"] == 4  # steps 3 and 4 ran again and saved checkpoint-4 whole


# ---- kill -9 during a write ----------------------------------------------------------------------------------
_SLOW_CONVERT = """
import sys, time
import llava_manager.checkpoint.conversion as conversion

original = conversion._convert_into

def slow(*args, **kwargs):
    original(*args, **kwargs)
    time.sleep(120)  # the model is written into the temporary folder: the parent kills us here

conversion._convert_into = slow
conversion.convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def _wait_for(predicate, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_rerun_removes_what_a_killed_conversion_left(tmp_path):
    import signal
    import subprocess
    import sys

    source = write_checkpoint("static_all_anyres", tmp_path / "src" / "checkpoint", tower=True)
    out = tmp_path / "converted"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(source), str(out)])
    try:
        # kill when the temporary folder holds the written weights (not after a fixed sleep)
        temporary = _wait_for(
            lambda: [p for p in tmp_path.glob(".converted.tmp-*") if (p / "model.safetensors").is_file()]
        )[0]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert temporary.is_dir() and not out.exists()  # what a kill -9 leaves
    convert_checkpoint(source, out, progress=False)  # the re-run
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".converted.*")), "the dead writer's temporary folder is still there"


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    import subprocess
    import sys

    from llava_manager.checkpoint.folders import OWNER_FILE, atomic_directory, leftover_temporaries

    final = tmp_path / "out"
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": None}))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    owner = {"pid": int(finished.stdout), "host": socket.gethostname(), "start": None}
    (dead / OWNER_FILE).write_text(json.dumps(owner))
    assert leftover_temporaries(final) == [dead]
    with atomic_directory(final) as temporary:
        (temporary / "file").write_text("x")
    assert live.is_dir() and not dead.exists()
    assert sorted(p.name for p in final.iterdir()) == ["file"]  # the owner file is not part of the result


def test_a_failed_write_leaves_no_empty_folders(tmp_path):
    from llava_manager.checkpoint.folders import atomic_directory

    final = tmp_path / "cache" / "v1" / "hub" / "repo" / "out"
    (tmp_path / "cache").mkdir()
    with pytest.raises(RuntimeError), atomic_directory(final):
        raise RuntimeError("wrong-shaped weights")
    assert list((tmp_path / "cache").iterdir()) == []  # the folders it made are gone, the one that was there stays


def test_the_cache_command_lists_and_cleans_what_no_load_will_use(tmp_path, capsys):
    import subprocess
    import sys

    import llava_manager
    from llava_manager.checkpoint.folders import OWNER_FILE
    from llava_manager.cli import main
    from llava_manager.version import __version__

    source = write_checkpoint("static_all_anyres", tmp_path / "src" / "checkpoint", tower=True)
    cache = tmp_path / "cache"
    llava_manager.from_pretrained(str(source), conversion_cache_dir=str(cache), progress=False)
    [converted] = [p.parent for p in cache.rglob("llava_manager_conversion.json")]
    local = cache / f"v{__version__}" / "local"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, pid in ((".x.tmp-dead", int(finished.stdout)), (".y.tmp-live", os.getpid())):
        (local / name).mkdir()
        (local / name / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": None}))
        (local / name / "model.safetensors").write_bytes(b"half")
    (local / "cut-short").mkdir()
    (local / "cut-short" / "config.json").write_text("{}")  # no marker: never finished
    (cache / "v0.0.1" / "local" / "old").mkdir(parents=True)
    (cache / "v0.0.1" / "local" / "old" / "model.safetensors").write_bytes(b"old")

    assert main(["cache", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    for kind in ("converted", "abandoned", "in progress", "incomplete", "other version"):
        assert kind in listing, listing
    assert str(source) in listing  # a conversion is listed with its source

    assert main(["cache", "clean", "--dry-run", "--cache-dir", str(cache)]) == 0
    assert "would remove 3 folder(s)" in capsys.readouterr().out
    assert (local / ".x.tmp-dead").is_dir()  # a dry run removes nothing

    assert main(["cache", "clean", "--cache-dir", str(cache)]) == 0
    assert "removed 3 folder(s)" in capsys.readouterr().out
    assert not (local / ".x.tmp-dead").exists() and not (local / "cut-short").exists()
    assert not (cache / "v0.0.1").exists()
    assert (local / ".y.tmp-live").is_dir() and converted.is_dir()  # a live writer's and the usable one stay

    assert main(["cache", "clean", "--all", "--cache-dir", str(cache)]) == 0
    assert not converted.exists() and (local / ".y.tmp-live").is_dir()
