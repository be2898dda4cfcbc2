"""Managers-only weights (`save_managers` / `load_managers`): a trained Manager set moves onto a fresh base model and
computes exactly what the whole trained model computed; mismatched bases and edited folders are refused unchanged."""

import json

import pytest
import torch
from hub_stand_in import populate_hub_cache
from inputs import mixed_media_batch, single_image_batch
from test_patch import perturb

from llava_manager import ImageLayout, ManagerConfig, ManagerError, is_patched, patch_llava
from llava_manager.checkpoint.assembly import build_processor
from llava_manager.checkpoint.managers_only import CONFIG_NAME, WEIGHTS_NAME, load_managers, save_managers
from llava_manager.testing.tiny import tiny_model, tiny_tokenizer


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _trained(config: ManagerConfig, layout: ImageLayout | None = None, seed: int = 1):
    """A patched tiny model whose Managers, projector and newline all differ from the base's."""
    model = patch_llava(tiny_model(), config, layout=layout)
    perturb(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in [*model.model.multi_modal_projector.parameters(), model.model.image_newline]:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


CASES = {
    "static": (ManagerConfig(vision_layers=[1, 2, 3], llm_layers=[0, 2]), None),
    "adaptive_cross": (ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 3], query_token_id=1), None),
    "projector_square": (ManagerConfig(injection="projector", layer_embedding=False), ImageLayout(mode="square")),
}


@pytest.mark.parametrize("case", CASES)
def test_managers_moved_onto_a_fresh_base_give_identical_logits(tmp_path, case):
    config, layout = CASES[case]
    trained = _trained(config, layout)
    # a square layout counts its image tokens differently: its own processor (which the plain base cannot run)
    batch = single_image_batch(build_processor(trained.config, tiny_tokenizer())) if layout else mixed_media_batch()
    expected = _logits(trained, batch)

    folder = save_managers(trained, tmp_path / "managers", include=("projector", "image_newline"))
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["manager"] == trained.config.manager and saved["image_layout"] == trained.config.image_layout
    assert saved["base_model"]["text_hidden_size"] == 64 and saved["includes"] == [
        "managers",
        "projector",
        "image_newline",
    ]

    base = tiny_model().eval()
    if layout is None:
        assert not torch.equal(_logits(base, batch), expected)  # the base alone differs: the load must do the work
    loaded = load_managers(base, folder)
    assert (
        loaded is base and is_patched(base) and type(base).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    )
    assert base.config.manager == trained.config.manager and base.config.image_layout == trained.config.image_layout
    assert torch.equal(_logits(base, batch), expected)


def test_without_include_only_the_managers_travel(tmp_path):
    trained = _trained(CASES["static"][0])
    save_managers(trained, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / WEIGHTS_NAME), "pt") as weights:
        keys = sorted(weights.keys())  # noqa: SIM118
    assert keys == sorted(f"manager.{name}" for name in trained.model.manager.state_dict())
    base = tiny_model()
    projector_before = {k: v.clone() for k, v in base.model.multi_modal_projector.state_dict().items()}
    load_managers(base, tmp_path / "m")
    for key, value in base.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, projector_before[key])  # the base's own projector stays
    for key, value in trained.model.manager.state_dict().items():
        assert torch.equal(base.model.manager.state_dict()[key], value)


def test_the_managers_of_the_0_5b_shapes_fit_in_under_a_megabyte(tmp_path):
    """LLaVA-OV-0.5B's shapes (SigLIP 1152 x 26 layers, Qwen2 896 x 24 layers) with the paper's Managers, built on
    the meta device; only the Managers are materialised."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26, image_size=384,
            patch_size=14,
        ),
        text_config=Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
            num_hidden_layers=24, vocab_size=151936,
        ),
        image_token_index=151646,
    )  # fmt: skip
    with torch.device("meta"):
        model = patch_llava(LlavaOnevisionForConditionalGeneration(config), ManagerConfig())
    model.model.manager.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.model.manager.parameters():
            parameter.normal_()
    count = sum(p.numel() for p in model.model.manager.parameters())
    folder = save_managers(model, tmp_path / "m")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 1_000_000 and size >= 4 * count  # fp32: every parameter is in the file
    print(f"0.5B Managers: {count} parameters, {size} bytes")


def test_a_base_with_other_shapes_is_refused_and_left_alone(tmp_path):
    save_managers(_trained(CASES["static"][0]), tmp_path / "m")
    other = tiny_model(text_hidden=96, text_layers=6)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ManagerError, match=r"text_hidden_size 96 \(trained on 64\), text_num_hidden_layers 6 \(trained on 4\)"
    ):
        load_managers(other, tmp_path / "m")
    assert not is_patched(other) and type(other).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())


def test_an_edited_weights_file_is_refused_and_the_base_left_alone(tmp_path):
    from safetensors.torch import load_file, save_file

    save_managers(_trained(CASES["static"][0]), tmp_path / "m", include=("projector",))
    weights = load_file(tmp_path / "m" / WEIGHTS_NAME)
    key = next(k for k in weights if k.startswith("manager."))
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / "m" / WEIGHTS_NAME)
    base = tiny_model()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ManagerError, match=f"missing.*{key}"):
        load_managers(base, tmp_path / "m")
    assert not is_patched(base) and all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ManagerError, match="patched with Managers"):
        save_managers(tiny_model(), tmp_path / "a")
    trained = _trained(CASES["static"][0])
    with pytest.raises(ManagerError, match="include=.*unknown"):
        save_managers(trained, tmp_path / "a", include=("lm_head",))
    save_managers(trained, tmp_path / "a")
    with pytest.raises(ManagerError, match="exists; pass overwrite=True"):
        save_managers(trained, tmp_path / "a")
    save_managers(trained, tmp_path / "a", overwrite=True)
    trained.save_pretrained(tmp_path / "full")
    with pytest.raises(ManagerError, match="full checkpoint"):
        load_managers(tiny_model(), tmp_path / "full")
    with pytest.raises(ManagerError, match="already patched"):
        load_managers(trained, tmp_path / "a")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ManagerError, match="needs repo_id"):
        save_managers(trained, tmp_path / "b", push_to_hub=True)
    assert not (tmp_path / "b").exists()


def test_from_the_hub_cache_offline(tmp_path):
    trained = _trained(CASES["static"][0])
    save_managers(trained, tmp_path / "repo", include=("projector", "image_newline"))
    populate_hub_cache(tmp_path / "cache", tmp_path / "repo", repo_id="someone/tiny-managers")
    base = load_managers(tiny_model(), "someone/tiny-managers", cache_dir=tmp_path / "cache")
    batch = single_image_batch()
    assert torch.equal(_logits(base.eval(), batch), _logits(trained, batch))


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(
                ("upload", sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()), repo_id)
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    save_managers(_trained(CASES["static"][0]), tmp_path / "m", push_to_hub=True, repo_id="me/m", private=True)
    assert calls == [("token", None), ("create", "me/m", True, True), ("upload", [CONFIG_NAME, WEIGHTS_NAME], "me/m")]


def test_a_layout_only_base_takes_the_saved_layout_and_keeps_its_own_on_failure(tmp_path):
    """A released `Baseline*` checkpoint loads patched with an image layout and no Managers."""
    trained = _trained(CASES["static"][0])
    save_managers(trained, tmp_path / "m", include=("projector", "image_newline"))
    base = patch_llava(tiny_model(), layout=ImageLayout(mode="square"), managers=False)
    load_managers(base, tmp_path / "m")
    assert base.config.image_layout == trained.config.image_layout and base.config.manager == trained.config.manager
    batch = single_image_batch()
    assert torch.equal(_logits(base.eval(), batch), _logits(trained, batch))

    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "m" / WEIGHTS_NAME)
    save_file({k: v for k, v in weights.items() if k != "image_newline"} | {"extra.bias": weights["image_newline"]},
              tmp_path / "m" / WEIGHTS_NAME)  # fmt: skip
    base = patch_llava(tiny_model(), layout=ImageLayout(mode="square"), managers=False)
    with pytest.raises(ManagerError, match=r"unknown keys \['extra.bias'\]"):
        load_managers(base, tmp_path / "m")
    assert is_patched(base) and base.config.manager is None and base.config.image_layout["mode"] == "square"


def test_a_corrupt_weights_file_is_named(tmp_path):
    save_managers(_trained(CASES["static"][0]), tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    base = tiny_model()
    with pytest.raises(ManagerError, match=f"{WEIGHTS_NAME} cannot be read"):
        load_managers(base, tmp_path / "m")
    assert not is_patched(base)


def test_a_training_run_writes_managers_that_rebuild_it_on_its_base(tmp_path):
    """`train` from a base checkpoint, Managers and projector trained: `OUT/managers` on that base gives exactly the
    logits of the run's full model (ZeRO-2, one process)."""
    from train_helpers import (
        eval_logits,
        from_checkpoint,
        keep_torch_threads,
        reload_trained,
        save_checkpoint,
        tiny_recipe,
    )

    from llava_manager.train.main import train

    threads = keep_torch_threads()
    next(threads)
    base_dir = save_checkpoint(tiny_model(), tmp_path / "base")
    recipe = tiny_recipe(
        tmp_path,
        *from_checkpoint(base_dir),
        *("--train_parts", "manager,projector", "--deepspeed", "zero2", "--max_steps", "3"),
    )
    result = train(recipe)
    folder = result.output_dir / "managers"
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["trained_parts"] == ["manager", "projector"] and saved["includes"][1:] == [
        "projector",
        "image_newline",
    ]
    assert saved["base_model"]["name_or_path"] == str(base_dir)
    batch = result.trainer.data_collator([result.trainer.train_dataset[i] for i in range(4)])
    batch.pop("dropped_samples")
    full = reload_trained(result.output_dir)
    from transformers import AutoModelForImageTextToText

    rebuilt = load_managers(AutoModelForImageTextToText.from_pretrained(base_dir), folder)
    assert torch.equal(eval_logits(rebuilt, batch), eval_logits(full, batch))
    assert not torch.equal(
        eval_logits(AutoModelForImageTextToText.from_pretrained(base_dir), batch), eval_logits(full, batch)
    )
    next(threads, None)


def test_managers_of_a_run_that_trained_the_llm_warn_on_load(tmp_path):
    save_managers(_trained(CASES["static"][0]), tmp_path / "m", trained_parts=["manager", "language_model"])
    with pytest.warns(UserWarning, match="also trained language_model"):
        load_managers(tiny_model(), tmp_path / "m")


@pytest.fixture
def base_and_managers(tmp_path):
    """A base checkpoint folder (model + processor) and Managers trained on it (projector included)."""
    from train_helpers import save_checkpoint

    save_checkpoint(tiny_model(), tmp_path / "base")
    trained = _trained(CASES["static"][0])
    save_managers(trained, tmp_path / "managers", include=("projector", "image_newline"))
    return tmp_path / "base", tmp_path / "managers", trained


def test_from_pretrained_takes_a_managers_folder_and_a_base(base_and_managers):
    import llava_manager

    base_dir, managers_dir, trained = base_and_managers
    batch = single_image_batch()
    model, processor = llava_manager.from_pretrained(managers_dir, base_model=base_dir)
    assert torch.equal(_logits(model, batch), _logits(trained, batch))
    assert type(processor).__name__.endswith("Processor")
    with pytest.raises(llava_manager.ConversionError, match="records no base model; pass base_model="):
        llava_manager.from_pretrained(managers_dir)  # saved from a model built in code: no base name recorded


def test_chat_takes_managers_and_a_base(base_and_managers, tmp_path, capsys):
    from PIL import Image

    from llava_manager.cli import main

    base_dir, managers_dir, _ = base_and_managers
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    args = ["--image", str(image), "--max-new-tokens", "4", "--no-stream", "What color?"]
    assert main(["chat", str(managers_dir), "--base", str(base_dir), *args]) == 0
    answer = capsys.readouterr().out.strip()
    import llava_manager
    from llava_manager.chat import ask, load_images

    model, processor = llava_manager.from_pretrained(managers_dir, base_model=base_dir)
    assert answer == ask(model, processor, load_images([str(image)]), "What color?", max_new_tokens=4, stream=False)


def test_from_pretrained_gives_a_processor_for_the_managers_layout(base_and_managers, tmp_path):
    """Managers trained in square mode: the base's (anyres) processor would count the wrong number of image tokens."""
    import llava_manager

    base_dir = base_and_managers[0]
    config, layout = CASES["projector_square"]
    trained = _trained(config, layout)
    save_managers(trained, tmp_path / "square", include=("projector", "image_newline"))
    model, processor = llava_manager.from_pretrained(tmp_path / "square", base_model=base_dir)
    assert processor.image_layout["mode"] == "square"
    batch = single_image_batch(processor)
    assert torch.equal(_logits(model, batch), _logits(trained, batch))
