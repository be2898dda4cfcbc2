"""The transformers model contract with Managers attached: the bare LlavaOnevisionModel, initialisation through
`_init_weights` (meta device, missing keys), `get_image_features` outputs, and a failed patch changing nothing."""

import pytest
import torch
from inputs import single_image_batch
from test_patch import CONFIGS, hook_counts, perturb
from transformers import AutoModel, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from llava_manager import (
    LlavaOnevisionManagerForConditionalGeneration,
    LlavaOnevisionManagerModel,
    ManagerConfig,
    is_patched,
    patch_llava,
    unpatch_llava,
)
from llava_manager import injection as injection_module
from llava_manager.managers import TowerManager
from llava_manager.testing.tiny import tiny_config, tiny_model

BARE_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def bare_model(seed=0) -> LlavaOnevisionModel:
    torch.manual_seed(seed)
    return LlavaOnevisionModel(tiny_config()).eval()


def hidden(model, batch):
    with torch.no_grad():
        return model(**{k: batch[k] for k in BARE_INPUTS}).last_hidden_state


def manager_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "manager" in n.split(".")}


@pytest.mark.parametrize("config_name", CONFIGS)
def test_bare_model_patches_saves_loads_and_unpatches(config_name, tmp_path):
    model, batch = bare_model(), single_image_batch()
    before, keys, hooks = hidden(model, batch), set(model.state_dict()), hook_counts(model)
    patch_llava(model, CONFIGS[config_name])
    assert type(model) is LlavaOnevisionManagerModel and is_patched(model)
    torch.testing.assert_close(hidden(model, batch), before, atol=1e-6, rtol=0)  # identity at init
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.manager.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    trained = hidden(model, batch)
    assert (trained - before).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlavaOnevisionManagerModel and is_patched(loaded)
    assert torch.equal(hidden(loaded, batch), trained)

    for target in (model, loaded):
        unpatch_llava(target)
        assert type(target) is LlavaOnevisionModel and not is_patched(target)
        assert set(target.state_dict()) == keys
    assert hook_counts(model) == hooks and torch.equal(hidden(model, batch), before)


def test_a_subclass_keeps_its_class_and_gets_managers():
    class MyLlava(LlavaOnevisionForConditionalGeneration):
        pass

    model = MyLlava(tiny_config()).eval()
    patch_llava(model)
    assert type(model) is MyLlava and type(model.model) is LlavaOnevisionManagerModel and is_patched(model)
    unpatch_llava(model)
    assert type(model) is MyLlava and type(model.model) is LlavaOnevisionModel and not hasattr(model.model, "manager")


def manager_config_of(config_name):
    model = patch_llava(tiny_model(), CONFIGS[config_name])
    return model.config


@pytest.mark.parametrize("model_class", [LlavaOnevisionManagerForConditionalGeneration, LlavaOnevisionManagerModel])
@pytest.mark.parametrize("config_name", CONFIGS)
def test_transformers_initialises_the_managers(model_class, config_name):
    """Meta-device construction then `init_weights()`, and loading with every Manager key missing: the Managers
    get their initial values from `_init_weights` (zero weights: identity), as when built in memory."""
    config = manager_config_of(config_name)
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in manager_tensors(model):
            model.get_parameter(parameter).fill_(float("nan"))  # what uninitialised memory may hold
    model.init_weights()
    from_missing_keys = model_class.from_pretrained(None, config=config, state_dict={})
    for built in (model, from_missing_keys):
        tensors = manager_tensors(built)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        for name, tensor in tensors.items():
            module = built.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, TowerManager):  # scores 1/N, temperature 1, gate 0; its LayerNorms: 1 and 0
                expected = {"layer_scores": 1 / module.num_layers, "temperature": 1.0, "gate": 0.0}
                assert torch.equal(tensor, torch.full_like(tensor, expected[name.rsplit(".", 1)[1]])), name
            elif name.endswith(("layer_scores", "zero_gate", "layer_scale", "bias")):  # bias: the tower's LayerNorms
                assert torch.equal(tensor, torch.zeros_like(tensor)), name
            elif ".norms." in name:
                assert torch.equal(tensor, torch.ones_like(tensor)), name
            if name.endswith("layer_embedding.weight"):
                width = tensor.shape[-1]
                assert 0.5 / width**0.5 < tensor.std() < 2 / width**0.5, name


def test_loading_a_checkpoint_keeps_its_manager_weights(tmp_path):
    """`_init_weights` must not overwrite Manager weights that were loaded."""
    model = patch_llava(tiny_model())
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = LlavaOnevisionManagerForConditionalGeneration.from_pretrained(tmp_path)
    saved, reloaded = manager_tensors(model), manager_tensors(loaded)
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)


@pytest.mark.parametrize("config_name", ["static", "projector"])
@pytest.mark.parametrize("request_kind", ["hidden_states", "attentions"])
def test_get_image_features_returns_what_vanilla_returns(config_name, request_kind):
    model, batch = tiny_model(), single_image_batch()
    arguments = {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]}
    flag = {f"output_{request_kind}": True}
    with torch.no_grad():
        vanilla = model.model.get_image_features(**arguments, **flag)
        patch_llava(model, CONFIGS[config_name])
        patched = model.model.get_image_features(**arguments, **flag)
        as_tuple = model.model.get_image_features(**arguments, return_dict=False)
    expected, got = getattr(vanilla, request_kind), getattr(patched, request_kind)
    assert expected is not None and got is not None and len(got) == len(expected)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert isinstance(as_tuple, tuple)
    for a, b in zip(patched.pooler_output, as_tuple[1]):
        assert torch.equal(a, b)


def test_a_patch_failing_midway_changes_nothing(monkeypatch):
    """A failure after some hooks were installed (here: the LLM injection, after the vision capture) removes them."""
    model = tiny_model()
    hooks, model_class, model_config, keys = hook_counts(model), type(model), model.config, set(model.state_dict())
    real = injection_module.LLMInjection._make_layer_hook
    calls = []

    def failing(self, index):
        calls.append(index)
        if index == 1:
            raise RuntimeError("injected failure")
        return real(self, index)

    monkeypatch.setattr(injection_module.LLMInjection, "_make_layer_hook", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        patch_llava(model, ManagerConfig(llm_layers=[0, 2]))
    assert calls == [0, 1]  # it failed with hooks on the tower and on decoder layer 0 already installed
    assert hook_counts(model) == hooks and set(model.state_dict()) == keys
    assert type(model) is model_class and type(model.model) is LlavaOnevisionModel and model.config is model_config
    assert not is_patched(model) and "get_image_features" not in vars(model.model)
