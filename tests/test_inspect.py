"""Manager weights as a table and a PNG heatmap (`llava_manager.inspect_weights`, `llava-manager inspect`)."""

import math
import shutil

import numpy as np
import pytest
import torch
from hub_stand_in import ORACLE_DIR, TOWER, write_checkpoint
from PIL import Image
from test_patch import perturb

from llava_manager import ManagerConfig, ManagerError, patch_llava
from llava_manager.cli import main
from llava_manager.inspect_weights import (
    format_table,
    manager_weights,
    plot_manager_weights,
    read_manager_stack,
)
from llava_manager.testing.tiny import tiny_model, tiny_processor


def patched(config=None, seed=1):
    model = patch_llava(tiny_model(), config or ManagerConfig(llm_layers=[0, 2]))
    perturb(model, seed=seed)
    return model.eval()


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---- the numbers ---------------------------------------------------------------------------------------
def test_static_weights_are_mean_abs_over_channels():
    model = patched()
    weights = manager_weights(model)
    stack = model.model.manager
    assert weights.rows == ["LLM 0", "LLM 2"] and weights.vision_layers == stack.config.vision_layers == [2, 3]
    for row, manager in zip(weights.values, stack.managers):
        expected = manager.layer_scores.abs().mean(-1).tolist()
        assert row[: len(expected)] == pytest.approx(expected)
    assert math.isnan(weights.values[0][-1])  # the LLM-0 Manager has no weight for the last vision layer
    assert weights.kinds == ["static", "static"] and not weights.is_identity


def test_a_fresh_patch_is_reported_as_identity():
    weights = manager_weights(patch_llava(tiny_model(), ManagerConfig(llm_layers=[0, 2])))
    assert weights.is_identity
    assert "untrained (identity)" in format_table(weights)


def test_adaptive_managers_show_their_gate():
    config = ManagerConfig(manager_type="adaptive_average", llm_layers=[0, 1, 3], query_token_id=1)
    model = patched(config)
    weights = manager_weights(model)
    assert weights.kinds == ["static", "adaptive", "adaptive"]
    gate = model.model.manager.managers[1].zero_gate
    assert weights.values[1] == pytest.approx(gate.abs().mean(-1).tolist())
    table = format_table(weights)
    assert "LLM 1 (gate)" in table and "adaptive_average Managers" in table


def test_bridge_managers_show_their_scale_in_the_bridged_layer_only():
    config = ManagerConfig(manager_type="bridge", vision_layers=[1, 2, 3], llm_layers=[0, 2], bridge_layers=[2, 3])
    model = patched(config)
    weights = manager_weights(model)
    assert weights.kinds == ["bridge", "bridge"] and weights.temperatures is None
    for row, column, manager in zip(weights.values, [1, 2], model.model.manager.managers):
        assert row[column] == pytest.approx(manager.layer_scale.abs().mean().item())
        assert all(math.isnan(v) for i, v in enumerate(row) if i != column)
        assert weights.channel_values[weights.values.index(row)] == pytest.approx(manager.layer_scale.tolist())
    assert "LLM 2 (bridge)" in format_table(weights)


def test_tower_managers_show_softmax_weights_temperature_and_gate():
    model = patched(ManagerConfig(manager_type="tower", vision_layers=[1, 2, 3], llm_layers=[0, 2]))
    weights = manager_weights(model)
    assert weights.kinds == ["tower", "tower"] and not weights.is_identity
    for index, manager in enumerate(model.model.manager.managers):
        softmax = torch.softmax(manager.layer_scores / manager.temperature, dim=0)  # over the layers, per channel
        assert weights.values[index] == pytest.approx(softmax.mean(-1).tolist())
        assert sum(weights.values[index]) == pytest.approx(1.0)
        assert weights.temperatures[index] == pytest.approx(manager.temperature.item())
        assert weights.channel_values[index] == pytest.approx(manager.gate.tolist())
    table = format_table(weights)
    assert table.splitlines()[0].split()[-2:] == ["tau", "|gate|"] and "softmax layer weights" in table
    fresh = manager_weights(patch_llava(tiny_model(), ManagerConfig(manager_type="tower")))
    assert fresh.is_identity and fresh.values[0] == pytest.approx([0.5, 0.5])  # uniform weights, zero gate


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_bridge_and_tower_heatmaps_add_the_per_channel_panel(manager_type, tmp_path):
    model = patched(ManagerConfig(manager_type=manager_type, llm_layers=[0, 2]))
    first = plot_manager_weights(manager_weights(model), tmp_path / "a.png")
    plain = plot_manager_weights(manager_weights(patched()), tmp_path / "static.png")
    assert pixels(first).shape[0] > 1.5 * pixels(plain).shape[0]  # two panels
    manager = model.model.manager.managers[1]
    with torch.no_grad():  # one channel of the scale / gate changes: only the per-channel panel can show it
        (manager.layer_scale if manager_type == "bridge" else manager.gate)[3].mul_(-1.0)
    changed = plot_manager_weights(manager_weights(model), tmp_path / "b.png")
    differs = (pixels(changed) != pixels(first)).any(axis=-1)
    half = differs.shape[0] // 2
    assert differs[half:].any()


def test_projector_injection_is_one_row():
    weights = manager_weights(patched(ManagerConfig(injection="projector", vision_layers=[1, 2, 3])))
    assert weights.rows == ["projector"] and weights.vision_layers == [1, 2, 3]
    assert not any(math.isnan(v) for v in weights.values[0])


def test_an_unpatched_model_has_nothing_to_inspect():
    with pytest.raises(ManagerError, match="no Managers"):
        manager_weights(tiny_model())


def test_table_lists_every_row_and_column():
    table = format_table(manager_weights(patched()))
    lines = table.splitlines()
    assert lines[0].split() == ["manager", "v2", "v3", "top"]
    assert lines[2].startswith("LLM 0") and " - " in lines[2] + " "
    assert lines[3].startswith("LLM 2")


# ---- the PNG ------------------------------------------------------------------------------------------
def test_heatmap_png_reads_back_and_follows_the_weights(tmp_path):
    model = patched(ManagerConfig(llm_layers=[0, 1, 2, 3], vision_layers=[0, 1, 2, 3]))
    first = plot_manager_weights(manager_weights(model), tmp_path / "a.png")
    with Image.open(first) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= 400 and height >= 250  # a real figure, not an empty placeholder
    same = plot_manager_weights(manager_weights(model), tmp_path / "b.png")
    assert np.array_equal(pixels(first), pixels(same))  # deterministic

    with torch.no_grad():  # change one Manager's weights: the picture changes
        model.model.manager.managers[2].layer_scores[1].mul_(4.0)
    changed = plot_manager_weights(manager_weights(model), tmp_path / "c.png")
    assert pixels(changed).shape == pixels(first).shape
    assert (pixels(changed) != pixels(first)).any(axis=-1).mean() > 0.001


def test_loss_curves_png(tmp_path):
    from llava_manager.demo.plots import plot_loss_curves

    curves = {"with Managers": [(s, 5.0 / s) for s in range(1, 50)], "baseline": [(s, 5.2 / s) for s in range(1, 50)]}
    path = plot_loss_curves(curves, tmp_path / "loss.png", title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 400


# ---- checkpoints and the command --------------------------------------------------------------------------
@pytest.fixture
def saved_tiny(tmp_path):
    model = patched()
    model.save_pretrained(tmp_path / "tiny")
    tiny_processor(model.config).save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


def test_read_manager_stack_matches_the_model(saved_tiny):
    model, folder = saved_tiny
    stack = read_manager_stack(folder)
    expected = model.model.manager.state_dict()
    assert stack.state_dict().keys() == expected.keys()
    assert all(torch.equal(stack.state_dict()[k], expected[k]) for k in expected)


def test_inspect_command_on_a_saved_checkpoint(saved_tiny, tmp_path, capsys):
    model, folder = saved_tiny
    out = tmp_path / "weights.png"
    assert main(["inspect", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert format_table(manager_weights(model)) in printed and str(out) in printed
    with Image.open(out) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_inspect_reads_bridge_and_tower_checkpoints(manager_type, tmp_path, capsys):
    """From config.json and the Manager tensors alone: the same table as the model in memory."""
    model = patched(ManagerConfig(manager_type=manager_type, llm_layers=[0, 2]))
    model.save_pretrained(tmp_path / "ckpt")
    tiny_processor(model.config).save_pretrained(tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt"), "--out", str(tmp_path / "w.png")]) == 0
    assert format_table(manager_weights(model)) in capsys.readouterr().out
    assert (tmp_path / "w.png").is_file()


@pytest.fixture
def converted(tmp_path, monkeypatch):
    """Original-format oracle checkpoints (static and adaptive), and their `llava-manager convert` output."""
    monkeypatch.setenv("LLAVA_MANAGER_CACHE", str(tmp_path / "conversions"))
    (tmp_path / TOWER).mkdir()
    shutil.copy(ORACLE_DIR / TOWER / "config.json", tmp_path / TOWER / "config.json")
    folders = {}
    for case in ("static_all_anyres", "adaptive_zerouni"):
        source = write_checkpoint(case, tmp_path / case)
        assert main(["convert", str(source), str(tmp_path / f"{case}-hf"), "--no-progress"]) == 0
        folders[case] = (source, tmp_path / f"{case}-hf")
    return folders


def test_inspect_converted_static_and_adaptive_checkpoints(converted, tmp_path, capsys):
    capsys.readouterr()
    for case, (source, hf) in converted.items():
        out = tmp_path / f"{case}.png"
        assert main(["inspect", str(hf), "--out", str(out)]) == 0
        from_hf = capsys.readouterr().out
        assert out.is_file() and "LLM 0" in from_hf
        assert ("(gate)" in from_hf) == case.startswith("adaptive")
        assert main(["inspect", str(source)]) == 0  # the original format: converted on the fly (cached)
        assert capsys.readouterr().out.splitlines()[:5] == from_hf.splitlines()[:5]


# ---- bad input: one clear line, non-zero exit -------------------------------------------------------------
def test_inspect_missing_model(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    lines = stderr_lines(capsys)
    assert len(lines) == 2 and "does not exist" in lines[0] and lines[0].startswith("llava-manager inspect: error:")


def test_inspect_a_checkpoint_without_managers(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "plain")
    assert main(["inspect", str(tmp_path / "plain")]) == 1
    lines = stderr_lines(capsys)
    assert len(lines) == 2 and "without Managers" in lines[0]


def test_inspect_an_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path / "broken")]) == 1
    lines = stderr_lines(capsys)
    assert len(lines) == 2 and "not valid JSON" in lines[0]


def test_inspect_bad_out_path(saved_tiny, tmp_path, capsys):
    _, folder = saved_tiny
    assert main(["inspect", str(folder), "--out", str(tmp_path / "weights.jpg")]) == 1
    assert "PNG" in stderr_lines(capsys)[0]
    assert main(["inspect", str(folder), "--out", str(tmp_path / "missing" / "w.png")]) == 1
    assert "does not exist" in stderr_lines(capsys)[0]
