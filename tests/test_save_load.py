"""HF-native save/load: safetensors, registered model type, bit-identical logits, strict about Managers."""

import json

import pytest
import torch
from inputs import single_image_batch
from test_patch import perturb
from transformers import AutoConfig, AutoModelForImageTextToText

from llava_manager import ManagerConfig, ManagerError, is_patched, patch_llava, unpatch_llava
from llava_manager.testing.tiny import tiny_model

CONFIGS = [
    ManagerConfig(llm_layers=[0, 2], grid="base"),
    ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 3], query_token_id=1),
    ManagerConfig(injection="projector", layer_embedding=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["static", "adaptive_cross", "projector"])
def test_save_then_auto_from_pretrained_is_bit_identical(tmp_path, config):
    model = patch_llava(tiny_model(), config)
    perturb(model)
    batch = single_image_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llava_onevision_manager" and saved["manager"]["manager_type"] == config.manager_type
    assert AutoConfig.from_pretrained(tmp_path).manager == saved["manager"]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert is_patched(loaded) and type(loaded).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert torch.equal(
        loaded.generate(**batch, max_new_tokens=4, do_sample=False),
        model.generate(**batch, max_new_tokens=4, do_sample=False),
    )


def test_loaded_model_unpatches_to_plain_llava(tmp_path):
    model = tiny_model()
    batch = single_image_batch()
    with torch.no_grad():
        plain = model(**batch).logits
    perturb(patch_llava(model))
    model.save_pretrained(tmp_path)
    loaded = unpatch_llava(AutoModelForImageTextToText.from_pretrained(tmp_path).eval())
    assert type(loaded).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert loaded.config.model_type == "llava_onevision" and not hasattr(loaded.config, "manager")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, plain)


def test_weights_that_do_not_fit_the_config_raise(tmp_path):
    model = patch_llava(tiny_model(), ManagerConfig(vision_layers=[1, 2, 3]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["manager"]["vision_layers"] = [2, 3]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManagerError, match="do not match the shapes"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_missing_manager_weights_raise(tmp_path):
    tiny_model().save_pretrained(tmp_path)  # plain weights ...
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llava_onevision_manager"  # ... under a config that declares Managers
    config["manager"] = ManagerConfig().to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManagerError, match="lack 2 of their tensors"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_patching_a_model_loaded_from_disk_saves_as_the_manager_type(tmp_path):
    tiny_model().save_pretrained(tmp_path / "plain")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "plain")
    patch_llava(model).save_pretrained(tmp_path / "patched")
    saved = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert saved["model_type"] == "llava_onevision_manager"
    assert is_patched(AutoModelForImageTextToText.from_pretrained(tmp_path / "patched"))
