"""The bridge and tower Managers: their formulas by hand (module and whole patched model), identity at init,
gradients, the tower's training noise, and `bridge_layers` in ManagerConfig."""

import copy

import pytest
import torch
from inputs import single_image_batch
from test_patch import logits

from llava_manager import ManagerConfig, ManagerConfigError, patch_llava
from llava_manager.managers import BridgeManager, TowerManager
from llava_manager.testing.tiny import tiny_config, tiny_model


def randomise(module, seed=0):
    """Random non-zero values in every parameter (zero-initialised Managers would make every comparison trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + 0.1)


def layer_norm_by_hand(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def tower_by_hand(manager, features, noise=None):
    """gate * sum_n softmax_n((W + noise) / tau) * LN_n(X_n), with softmax written out as exp / sum exp."""
    scores = manager.layer_scores if noise is None else manager.layer_scores + noise  # (N, D) or (..., N, D)
    scaled = scores / manager.temperature
    exp = torch.exp(scaled - scaled.amax(-2, keepdim=True))
    weights = exp / exp.sum(-2, keepdim=True)
    total = 0
    for n, norm in enumerate(manager.norms):
        total = total + weights[..., n, :] * layer_norm_by_hand(features[..., n, :], norm.weight, norm.bias)
    return total * manager.gate


# ---- the modules ---------------------------------------------------------------------------------------------


def test_a_bridge_manager_scales_exactly_its_one_layer():
    manager = BridgeManager(num_layers=4, width=8, layer=2).eval()
    features = torch.randn(5, 3, 4, 8, requires_grad=True)  # (crops, tokens, N, D)
    assert torch.equal(manager(features), torch.zeros(5, 3, 8))  # zero-initialised: identity at init
    randomise(manager)
    output = manager(features)
    torch.testing.assert_close(output, features[..., 2, :] * manager.layer_scale, atol=1e-6, rtol=0)
    output.sum().backward()
    assert manager.layer_scale.grad.abs().sum() > 0
    assert features.grad[..., [0, 1, 3], :].abs().sum() == 0 and features.grad[..., 2, :].abs().sum() > 0


@pytest.mark.parametrize("shape", [(7, 3, 16), (2, 5, 3, 16)], ids=["tokens", "crops-tokens"])
def test_a_tower_manager_computes_saum_and_its_gradients(shape):
    manager = TowerManager(num_layers=3, width=16).eval()
    features = torch.randn(shape, requires_grad=True)
    assert torch.equal(manager(features), torch.zeros(*shape[:-2], 16))  # zero gate: identity at init
    weights = manager.layer_weights()
    torch.testing.assert_close(weights, torch.full((3, 16), 1 / 3))  # scores 1/N: uniform weights at init
    randomise(manager)
    output = manager(features)
    torch.testing.assert_close(output, tower_by_hand(manager, features), atol=1e-6, rtol=0)
    output.pow(2).sum().backward()
    for name, parameter in manager.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_the_tower_adds_the_originals_score_noise_in_training_only():
    manager = TowerManager(num_layers=4, width=8, jitter=0.0)
    randomise(manager)
    features = torch.randn(6, 4, 8)
    torch.manual_seed(5)
    trained = manager(features)
    torch.manual_seed(5)
    noise = torch.randn(6, 4, 8) / 4  # N(0, (1/N)^2) per token, layer and channel, drawn as the module draws it
    torch.testing.assert_close(trained, tower_by_hand(manager, features, noise), atol=1e-6, rtol=0)
    assert (trained - manager.eval()(features)).abs().max() > 1e-4
    torch.testing.assert_close(manager(features), tower_by_hand(manager, features), atol=1e-6, rtol=0)


def test_the_tower_leaves_rows_outside_the_grid_span_at_zero():
    """features.py gives zero rows to the tokens a `grid` setting leaves alone; LayerNorm would map them to its bias."""
    manager = TowerManager(num_layers=2, width=8).eval()
    randomise(manager)
    features = torch.randn(5, 2, 8)
    features[[1, 3]] = 0
    output = manager(features)
    assert torch.equal(output[[1, 3]], torch.zeros(2, 8)) and output[[0, 2, 4]].abs().min() > 0


# ---- the whole patched model against a hand computation -------------------------------------------------------------


def _hand_layer_features(vanilla, manager_stack, batch, vision_layers):
    """(T, N, D) features of the image tokens: transformers' own tower, projector and packing per layer, plus the
    layer embedding (grid "all": every image token)."""
    pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
    llava = vanilla.model
    reference = llava.get_image_features(pixel_values, image_sizes, output_hidden_states=True)
    per_layer = []
    for index, entry in enumerate(vision_layers):
        projected = llava.multi_modal_projector(reference.hidden_states[entry])
        projected = projected + manager_stack.layer_embedding.weight[index]
        packed, _ = llava.pack_image_features(
            [projected], image_sizes, image_newline=llava.image_newline, vision_aspect_ratio="anyres_max_9"
        )
        per_layer.append(packed[0])  # (T, D); the newline rows hold image_newline in every layer
    return torch.stack(per_layer, dim=1)


def run_with_deltas(vanilla, batch, token_id, delta_of_layer):
    """The unpatched model with `delta_of_layer[k](hidden at the tokens, whole hidden)` added at `token_id` (sample 0)
    before decoder layer k."""
    rows = batch["input_ids"][0] == token_id
    handles = []
    for layer, delta_fn in delta_of_layer.items():

        def add(module, args, kwargs, delta_fn=delta_fn):
            hidden = args[0].clone()
            hidden[0, rows] += delta_fn(hidden[0, rows], hidden[0])
            return (hidden, *args[1:]), kwargs

        handles.append(vanilla.model.language_model.layers[layer].register_forward_pre_hook(add, with_kwargs=True))
    try:
        return logits(vanilla, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_the_patched_forward_equals_the_formula_by_hand(manager_type):
    batch = single_image_batch(size=(50, 30))  # a base crop, AnyRes grid crops and newline tokens
    vanilla = tiny_model()
    llm_layers, vision_layers = [0, 1, 3], [1, 2, 3]
    extra = {"bridge_layers": [3, 1, 3]} if manager_type == "bridge" else {}  # repeats allowed
    config = ManagerConfig(manager_type=manager_type, vision_layers=vision_layers, llm_layers=llm_layers, **extra)
    model = patch_llava(copy.deepcopy(vanilla), config)
    stack = model.model.manager
    randomise(stack)
    with torch.no_grad():
        features = _hand_layer_features(vanilla, stack, batch, vision_layers)  # (T, N, D)
        deltas = {}
        for llm_layer, manager in zip(llm_layers, stack.managers):
            if manager_type == "bridge":
                layer = vision_layers.index(extra["bridge_layers"][llm_layers.index(llm_layer)])
                deltas[llm_layer] = features[:, layer] * manager.layer_scale
            else:
                deltas[llm_layer] = tower_by_hand(manager, features)
        expected = run_with_deltas(
            vanilla, batch, vanilla.config.image_token_id, {k: lambda at, whole, d=d: d for k, d in deltas.items()}
        )
    got = logits(model, batch)
    assert (got - logits(vanilla, batch)).abs().max() > 1e-3  # the Managers do act
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_the_vision_space_managers_equal_the_formula_by_hand(manager_type):
    """injection="projector": the residual is added to the SigLIP feature entering the projector, on every crop."""
    batch = single_image_batch(size=(50, 30))
    vanilla = tiny_model()
    vision_layers = [1, 2]
    model = patch_llava(copy.deepcopy(vanilla), ManagerConfig(manager_type, vision_layers, injection="projector"))
    stack = model.model.manager
    randomise(stack)
    manager = stack.managers[0]
    with torch.no_grad():
        crops = batch["pixel_values"].flatten(0, 1)  # (crops, 3, H, W): one image, every crop
        hidden_states = vanilla.model.vision_tower(crops, output_hidden_states=True).hidden_states
        layers = torch.stack([hidden_states[v] for v in vision_layers], dim=-2) + stack.layer_embedding.weight
        if manager_type == "bridge":  # default: the top selected layer
            residual = layers[..., 1, :] * manager.layer_scale
        else:
            residual = tower_by_hand(manager, layers)  # (crops, P, C)
        hook = vanilla.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: (args[0] + residual,))
        expected = logits(vanilla, batch)
        hook.remove()
    got = logits(model, batch)
    assert (got - logits(vanilla, batch)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("manager_type", ["bridge", "tower"])
def test_gradients_reach_every_new_parameter(manager_type):
    model = patch_llava(tiny_model(), ManagerConfig(manager_type=manager_type, llm_layers=[0, 2]))
    randomise(model.model.manager)
    batch = single_image_batch()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, parameter in model.model.manager.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ---- bridge_layers in ManagerConfig -------------------------------------------------------------------------------


def _resolved(**fields):
    return ManagerConfig(**fields).resolve(tiny_config())  # SigLIP of 4 layers, LLM of 4 layers


def test_bridge_layers_default_to_the_top_selected_layers_bottom_to_top():
    assert _resolved(manager_type="bridge", vision_layers=[3, 1, 2, 0], llm_layers=[0, 2]).bridge_layers == [2, 3]
    assert _resolved(manager_type="bridge", injection="projector").bridge_layers == [3]
    assert _resolved(manager_type="tower").bridge_layers is None


def test_bridge_layers_pair_with_llm_layers_as_given():
    config = _resolved(manager_type="bridge", vision_layers=[1, 2, 4], llm_layers=[3, 0], bridge_layers=[1, -1])
    assert config.llm_layers == [0, 3] and config.bridge_layers == [4, 1]  # -1: the last of SigLIP's 4 layers


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"manager_type": "static", "bridge_layers": [1]}, "only manager_type='bridge'"),
        ({"manager_type": "bridge", "llm_layers": [0, 1], "bridge_layers": [3]}, "one vision layer per Manager"),
        ({"manager_type": "bridge", "llm_layers": [0], "vision_layers": [2, 3], "bridge_layers": [1]}, "not among"),
        ({"manager_type": "bridge", "llm_layers": [0, 1, 2], "vision_layers": [2, 3]}, "select more vision_layers"),
    ],
)
def test_bad_bridge_layers_name_the_fix(fields, message):
    with pytest.raises(ManagerConfigError, match=message):
        _resolved(**fields)
