"""patch_llava / unpatch_llava: identity at init, clean errors, exact inverse, what runs when."""

import pytest
import torch
from inputs import multi_image_batch, single_image_batch, text_only_batch
from torch import nn

from llava_manager import ManagerConfig, ManagerError, is_patched, patch_llava, unpatch_llava
from llava_manager.testing.tiny import tiny_model


def perturb(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.manager.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def hook_counts(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


BATCHES = {
    "single image with grid": single_image_batch,
    "multi-image": multi_image_batch,
    "text-only": text_only_batch,
}
CONFIGS = {
    "static": ManagerConfig(),
    "adaptive_cross": ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 1, 3], query_token_id=1),
    "projector": ManagerConfig(injection="projector"),
    "bridge": ManagerConfig(manager_type="bridge", vision_layers=[1, 2, 3], llm_layers=[0, 1, 3]),
    "tower": ManagerConfig(manager_type="tower", llm_layers=[0, 1, 3]),
}


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_identity_at_init(batch_name, config_name):
    model, batch = tiny_model(), BATCHES[batch_name]()
    before = logits(model, batch)
    patch_llava(model, CONFIGS[config_name])
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_trained_managers_change_only_what_follows_the_image(config_name):
    model, batch = tiny_model(), single_image_batch()
    before = logits(model, batch)
    perturb(patch_llava(model, CONFIGS[config_name]))
    after = logits(model, batch)
    first_image = (batch["input_ids"][0] == model.config.image_token_id).nonzero().min()
    assert torch.equal(after[:, :first_image], before[:, :first_image])  # causal: text before the image untouched
    assert (after[:, first_image:] - before[:, first_image:]).abs().max() > 1e-3


def test_unpatch_restores_module_tree_and_behaviour():
    model, batch = tiny_model(), single_image_batch()
    before = logits(model, batch)  # (transformers installs its own capture hooks on the first forward)
    keys, hooks, config_class = set(model.state_dict()), hook_counts(model), type(model.config)
    perturb(patch_llava(model))
    assert is_patched(model) and set(model.state_dict()) > keys
    unpatch_llava(model)
    assert not is_patched(model)
    assert set(model.state_dict()) == keys and hook_counts(model) == hooks
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and type(model.config) is config_class
    assert "get_image_features" not in vars(model.model) and not hasattr(model.model, "manager")
    assert torch.equal(logits(model, batch), before)


def test_patching_twice_or_a_wrong_model_raises_and_changes_nothing():
    model = patch_llava(tiny_model())
    with pytest.raises(ManagerError, match="already patched"):
        patch_llava(model)
    with pytest.raises(ManagerError, match="LlavaOnevisionForConditionalGeneration"):
        patch_llava(nn.Linear(2, 2))
    with pytest.raises(ManagerError, match="not patched"):
        unpatch_llava(tiny_model())


@pytest.mark.parametrize(
    "config",
    [ManagerConfig(vision_layers=[1, 9]), ManagerConfig(llm_layers=[7]), ManagerConfig(manager_type="adaptive")],
)
def test_bad_config_leaves_the_model_untouched(config):
    model = tiny_model()
    keys, hooks, model_class, model_config = set(model.state_dict()), hook_counts(model), type(model), model.config
    with pytest.raises(ValueError):
        patch_llava(model, config)
    assert set(model.state_dict()) == keys and hook_counts(model) == hooks
    assert type(model) is model_class and model.config is model_config and not is_patched(model)
    assert "get_image_features" not in vars(model.model)


def test_managers_are_registered_and_shown():
    model = patch_llava(tiny_model(), ManagerConfig(vision_layers=[1, 2, 3], llm_layers=[0, 2]))
    names = [n for n, _ in model.named_parameters() if ".manager." in n]
    assert names == [
        "model.manager.layer_embedding.weight",
        "model.manager.managers.0.layer_scores",
        "model.manager.managers.1.layer_scores",
    ]
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if ".manager." in n]
    assert shapes == [(3, 64), (2, 64), (3, 64)]  # layer 0 uses N-1 layers
    assert "llm_layers=[0, 2]" in repr(model)


def test_only_selected_vision_layers_are_captured():
    model = patch_llava(tiny_model(), ManagerConfig(vision_layers=[1, 3], llm_layers=[1]))
    layers = model.model.vision_tower.encoder.layers
    hooked = [i + 1 for i, layer in enumerate(layers) if layer._forward_hooks]
    assert hooked == [1, 3, 4]  # the two selected entries and the main feature (entry 4)
    computer = model.model.get_image_features
    seen = {}
    original = computer.capture.capture

    def spy():
        context = original()
        store = context.__enter__()
        seen["store"] = store
        return _Wrap(context, store)

    class _Wrap:
        def __init__(self, context, store):
            self.context, self.store = context, store

        def __enter__(self):
            return self.store

        def __exit__(self, *exc):
            seen["keys"] = sorted(self.store)
            return self.context.__exit__(*exc)

    computer.capture.capture = spy
    logits(model, single_image_batch())
    assert seen["keys"] == [1, 3, 4]


def _count_manager_calls(model):
    calls = []
    for index, module in enumerate(model.model.manager.managers):
        module.register_forward_hook(lambda m, a, o, index=index: calls.append(index))
    return calls


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("injection", ["llm", "projector", "adaptive_average", "adaptive_cross"])
def test_every_manager_runs_once_per_forward(batch_name, injection):
    config = {
        "llm": ManagerConfig(llm_layers=[0, 1, 3]),
        "projector": ManagerConfig(injection="projector"),
        "adaptive_average": ManagerConfig(manager_type="adaptive_average", llm_layers=[0, 1, 3], query_token_id=1),
        "adaptive_cross": ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 1, 3], query_token_id=1),
    }[injection]
    model = patch_llava(tiny_model(), config)
    model.train()
    calls = _count_manager_calls(model)
    batch = BATCHES[batch_name]()
    output = model(**batch, labels=batch["input_ids"])
    assert calls == list(range(len(model.model.manager.managers)))
    output.loss.backward()  # text-only included: every Manager parameter is in the graph (ZeRO-3 needs it)
    assert all(p.grad is not None for p in model.model.manager.parameters())


def test_gradients_reach_every_manager_parameter():
    config = ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 2], query_token_id=1)
    model = patch_llava(tiny_model(), config)
    perturb(model)
    batch = single_image_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, parameter in model.model.manager.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_only_jitter_differs_between_train_and_eval():
    batch = single_image_batch()
    model = patch_llava(tiny_model(), ManagerConfig(jitter=0.0))
    perturb(model)
    evaluated = logits(model, batch)
    model.train()
    torch.testing.assert_close(logits(model, batch), evaluated, atol=1e-6, rtol=0)  # no jitter: same function
    model.model.manager.managers[0].jitter = 0.01
    trained = logits(model, batch)
    assert 0 < (trained - evaluated).abs().max() < 0.5
    model.eval()
    torch.testing.assert_close(logits(model, batch), evaluated, atol=1e-6, rtol=0)


def _gradients(config_name, checkpointing_kwargs=None):
    """Parameter gradients of one training step (jitter off), with activation checkpointing if kwargs are given."""
    batch = single_image_batch()
    model = patch_llava(tiny_model(), CHECKPOINTED_CONFIGS[config_name])
    perturb(model)
    model.train()
    model.model.manager.apply(lambda m: setattr(m, "jitter", 0.0) if hasattr(m, "jitter") else None)
    if checkpointing_kwargs == "wrapper":  # torch's checkpoint wrapper around each layer (FSDP's way): hooks inside
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        layer_class = type(model.model.language_model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, layer_class))
        assert type(model.model.language_model.layers[0]).__name__ == "CheckpointWrapper"
    elif checkpointing_kwargs is not None:
        # transformers 5.24 renamed it (the old name warns, and goes in v6)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(checkpointing_kwargs)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    names = ((n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters())
    return {n: p.grad.clone() for n, p in names if p.grad is not None}


CHECKPOINTED_CONFIGS = {
    "static": ManagerConfig(llm_layers=[0, 1, 3]),
    "tower": ManagerConfig(manager_type="tower", llm_layers=[0, 1, 3]),  # its score noise is replayed exactly
    "adaptive_cross": ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 1, 3], query_token_id=1),
}


@pytest.mark.parametrize("config_name", CHECKPOINTED_CONFIGS)
def test_gradient_checkpointing_gives_the_same_gradients(config_name):
    """On every supported transformers: where the hooks run outside the checkpointed layer (>= 5.23) and where they
    run inside it and again in the backward (earlier releases, see checkpoint_replay.py)."""
    plain, checkpointed = _gradients(config_name), _gradients(config_name, {"use_reentrant": False})
    assert plain.keys() == checkpointed.keys() and any("manager" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("config_name", CHECKPOINTED_CONFIGS)
def test_a_checkpoint_wrapper_around_the_layers_gives_the_same_gradients(config_name):
    """FSDP's activation checkpointing wraps each decoder layer from outside, so the Manager hooks run inside the
    checkpointed region and again in the backward on every transformers release (without the replay the backward
    fails: 'A different number of tensors was saved')."""
    plain, wrapped = _gradients(config_name), _gradients(config_name, "wrapper")
    assert plain.keys() == wrapped.keys() and any("manager" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(wrapped[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reentrant_checkpointing_is_exact_or_refused():
    from llava_manager.checkpoint_replay import hooks_run_inside_checkpoint

    layer_class = type(tiny_model().model.language_model.layers[0])
    if hooks_run_inside_checkpoint(layer_class):  # transformers < 5.23
        with pytest.raises(ManagerError, match="use_reentrant"):
            _gradients("static", {"use_reentrant": True})
        return
    plain, checkpointed = _gradients("static"), _gradients("static", {"use_reentrant": True})
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_inputs_embeds_path_matches_input_ids():
    model = patch_llava(tiny_model(), ManagerConfig(manager_type="adaptive_last", llm_layers=[0, 2], query_token_id=1))
    perturb(model)
    batch = single_image_batch()
    expected = logits(model, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        got = model(inputs_embeds=embeds, **rest).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_layout_only_patch_has_no_managers():
    from llava_manager import ImageLayout

    model = patch_llava(tiny_model(), layout=ImageLayout(mode="square"), managers=False)
    assert is_patched(model) and not hasattr(model.model, "manager") and model.config.manager is None
    assert model.config.image_layout == {"mode": "square", "unpad": "round"}
    with pytest.raises(ManagerError, match="config=None"):
        patch_llava(tiny_model(), ManagerConfig(), managers=False)
