"""Where the Managers act: token positions for each grid type and injection site, and the multi-layer
features checked against transformers' own packing (an independent implementation)."""

import pytest
import torch
from inputs import multi_image_batch, single_image_batch
from test_patch import perturb

from llava_manager import ImageLayout, ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_model

BASE_TOKENS = 16  # (32 px / 8 px patches)^2 tokens per crop in the tiny model


def _layer0_delta(config, batch):
    """What the layer-0 Manager adds, per sequence position: (B, L) |delta| summed over channels."""
    model = patch_llava(tiny_model(), config)
    perturb(model)
    seen = {}
    language_model = model.model.language_model
    language_model.register_forward_pre_hook(lambda m, a, k: seen.update(before=k["inputs_embeds"]), with_kwargs=True)
    # registered after patch_llava's hook, so it sees the hidden state with the delta added
    language_model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(after=a[0]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    return (seen["after"] - seen["before"]).abs().sum(-1), model


@pytest.mark.parametrize("manager_type", ["static", "bridge", "tower"])  # tower: LayerNorm must not reach them
@pytest.mark.parametrize("grid", ["all", "base", "grid"])
def test_grid_types_touch_exactly_their_tokens(grid, manager_type):
    batch = single_image_batch(size=(50, 30))
    delta, model = _layer0_delta(ManagerConfig(manager_type, grid=grid, llm_layers=[0, 2]), batch)
    image_positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    first = image_positions[0].item()
    expected = torch.zeros_like(delta[0], dtype=torch.bool)
    if grid == "all":
        expected[image_positions] = True
    elif grid == "base":
        expected[first : first + BASE_TOKENS] = True
    else:
        expected[first + BASE_TOKENS : image_positions[-1] + 1] = True
    assert torch.equal(delta[0] > 0, expected)


def test_multi_image_sample_each_image_is_one_crop_plus_newline():
    batch = multi_image_batch()
    delta, model = _layer0_delta(ManagerConfig(grid="base", llm_layers=[0]), batch)
    image_positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    assert len(image_positions) == 2 * (BASE_TOKENS + 1)
    touched = (delta[0] > 0).nonzero().squeeze(-1)
    expected = torch.cat([image_positions[:BASE_TOKENS], image_positions[BASE_TOKENS + 1 : 2 * BASE_TOKENS + 1]])
    assert torch.equal(touched, expected)  # each image's base tokens, not the two newline tokens


@pytest.mark.parametrize("grid", ["all", "base", "grid"])
def test_projector_injection_touches_exactly_the_managed_crops(grid):
    batch = single_image_batch(size=(50, 30))
    model = tiny_model()
    with torch.no_grad():
        plain = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
    patch_llava(model, ManagerConfig(injection="projector", grid=grid))
    perturb(model)
    with torch.no_grad():
        managed = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output[0]
    changed = (managed - plain).abs().sum(-1) > 0
    is_newline = (plain == model.model.image_newline).all(-1)
    expected = torch.zeros_like(changed)
    if grid in ("all", "base"):
        expected[:BASE_TOKENS] = True
    if grid in ("all", "grid"):
        expected[BASE_TOKENS:] = ~is_newline[BASE_TOKENS:]  # newline tokens are not vision features
    assert is_newline.sum() > 0 and torch.equal(changed, expected)


@pytest.mark.parametrize("grid", ["all", "base", "grid"])
@pytest.mark.parametrize("aspect", ["anyres_max_100", "anyres_max_1"])  # no shrink (gather first) / shrink
@pytest.mark.parametrize("size", [(50, 30), (30, 95), (97, 96)])
def test_features_match_transformers_packing(size, aspect, grid):
    """Main and multi-layer features equal transformers' own get_image_features / pack_image_features applied to
    each projected layer (rows outside the grid span zero)."""
    batch = single_image_batch(size=size)
    model = tiny_model(vision_aspect_ratio=aspect)  # anyres_max_1: so small that the bilinear shrink triggers
    pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values, image_sizes, output_hidden_states=True)
        expected_main = reference.pooler_output[0]
        layers = [2, 3]
    config = ManagerConfig(vision_layers=layers, llm_layers=[1], grid=grid)
    patch_llava(model, config)
    perturb(model)
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values, image_sizes)
        expected_layers = []
        for index, entry in enumerate(layers):
            hidden = reference.hidden_states[entry]
            projected = model.model.multi_modal_projector(hidden) + model.model.manager.layer_embedding.weight[index]
            packed, _ = model.model.pack_image_features(
                [projected], image_sizes, image_newline=model.model.image_newline, vision_aspect_ratio=aspect
            )
            expected = packed[0]
            if grid == "base":
                expected[BASE_TOKENS:] = 0
            elif grid == "grid":
                expected[:BASE_TOKENS] = 0
            expected_layers.append(expected)
    assert torch.equal(output.pooler_output[0], expected_main)
    got_layers = output.deepstack_features[0][0].view(expected_main.shape[0], len(layers), -1)
    for index in range(len(layers)):
        torch.testing.assert_close(got_layers[:, index], expected_layers[index], atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(20, 120), (38, 100)])  # (width, height); the tall one drops 8 rows, < 10 newlines
def test_gather_projects_only_the_rows_the_layout_keeps(size):
    """Unpadding drops grid tokens and `grid="base"` drops every grid crop: the Managers' projector call sees only
    the kept rows, however few rows unpadding drops."""
    batch = single_image_batch(size=size)
    layers = [2, 3]
    seen_rows = {}
    for grid in ("all", "base"):
        patched = patch_llava(tiny_model(vision_aspect_ratio="anyres"), ManagerConfig(vision_layers=layers, grid=grid))
        calls = []
        hook = patched.model.multi_modal_projector.register_forward_hook(
            lambda module, args, out, calls=calls: calls.append(args[0].shape)
        )
        with torch.no_grad():
            output = patched.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
        hook.remove()
        main_shape, layer_shape = calls  # the main feature, then the N layers
        assert layer_shape[-2:] == (len(layers), patched.config.vision_config.hidden_size)
        seen_rows[grid] = layer_shape[0]
        crops, tokens = main_shape[0], main_shape[1]
    packed = output.pooler_output[0]  # (T, D)
    newlines = int((packed == patched.model.image_newline).all(-1).sum())
    assert seen_rows["base"] == BASE_TOKENS == tokens
    assert seen_rows["all"] == packed.shape[0] - newlines  # the kept rows, no stand-ins for the newlines
    assert newlines > 0 and packed.shape[0] - newlines < crops * tokens  # unpadding dropped rows of the grid


def test_square_layout_is_one_crop_without_newline():
    batch = single_image_batch(size=(50, 30))
    model = patch_llava(tiny_model(), ManagerConfig(), layout=ImageLayout(mode="square"))
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    assert features.pooler_output[0].shape[0] == BASE_TOKENS
    assert features.deepstack_features[0][0].shape[0] == BASE_TOKENS


def test_per_image_features_are_joined_without_a_copy_only_when_they_are_the_split_ones():
    from llava_manager.injection import _join_rows

    whole = torch.randn(10, 6)  # (T, N * D)
    parts = list(whole.split([4, 6]))
    joined = (tuple(parts), whole)
    assert _join_rows(parts, parts, joined) is whole
    rearranged = [parts[1], parts[0]]  # e.g. generation re-ordering images: the parts must be concatenated
    assert torch.equal(_join_rows(rearranged, rearranged, joined), torch.cat(rearranged))
    sliced = [parts[0], parts[1][:3]]
    assert torch.equal(_join_rows(sliced, sliced, joined), torch.cat(sliced))
    copies = [p.clone() for p in parts]  # equal values, other tensors: never mistaken for the split ones
    assert _join_rows(copies, copies, joined) is not whole


def test_a_two_image_forward_hands_the_injection_the_tensor_its_features_split():
    model = patch_llava(tiny_model(), ManagerConfig(vision_layers=[1, 2], llm_layers=[0, 1]))
    batch = multi_image_batch()
    with torch.no_grad():
        output = model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=torch.tensor([2])
        )
    parts = output.deepstack_features[0]
    split_parts, whole = output.joined_layer_features
    assert len(parts) == 2 and all(a is b for a, b in zip(split_parts, parts))
    assert torch.equal(whole, torch.cat(parts))
