"""Managers on LLaVA-OV's video path: identity at init, the video logits against an independent computation
(transformers' pooling of each projected layer, the Manager sum added by hand), mixed image / video / text batches,
`video=False`, and generate."""

import copy

import pytest
import torch
from inputs import clip, mixed_media_batch, single_image_batch, text_only_batch, video_batch, video_prompt
from test_aggregators import randomise
from test_patch import logits

from llava_manager import ManagerConfig, patch_llava
from llava_manager.managers import QueryContext
from llava_manager.testing.tiny import tiny_model, tiny_processor

CONFIGS = {
    "static": ManagerConfig(vision_layers=[1, 2, 3], llm_layers=[0, 1, 3]),
    "adaptive_cross": ManagerConfig(
        manager_type="adaptive_cross", vision_layers=[1, 2, 3], llm_layers=[0, 1, 3], query_token_id=1
    ),
    "projector": ManagerConfig(vision_layers=[1, 2, 3], injection="projector"),
    "tower": ManagerConfig(manager_type="tower", vision_layers=[1, 2, 3], llm_layers=[0, 2]),
}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("batch_name", ["video", "mixed"])
def test_identity_at_init_with_video(config_name, batch_name):
    batch = video_batch() if batch_name == "video" else mixed_media_batch()
    model = tiny_model()
    before = logits(model, batch)
    patch_llava(model, CONFIGS[config_name])
    assert torch.equal(logits(model, batch), before)


# ---- the independent computation ----------------------------------------------------------------------------------
def _pooled_layers_by_hand(vanilla, stack, pixel_values_videos, vision_layers):
    """(T, N, D): per layer, transformers' own projector and apply_pooling on the SigLIP entry (+ the layer
    embedding), the frames in order, then one image_newline slot."""
    llava = vanilla.model
    frames = pixel_values_videos.flatten(0, 1)
    hidden_states = llava.vision_tower(frames, output_hidden_states=True).hidden_states
    per_layer = []
    for index, entry in enumerate(vision_layers):
        projected = llava.multi_modal_projector(hidden_states[entry]) + stack.layer_embedding.weight[index]
        pooled = llava.apply_pooling(projected).reshape(-1, projected.shape[-1])  # (F * p, D)
        per_layer.append(torch.cat([pooled, llava.image_newline[None]]))
    return torch.stack(per_layer, dim=1)


def _instruction_by_hand(input_ids, video_id, im_start_id):
    """The user text after the video block: from after `<video>...<video>\\n` to before `<|im_end|>\\n`, as the
    released code's rule reads for a prompt `<|im_start|>user\\n<video>...\\n{question}<|im_end|>\\n<|im_start|>...`."""
    ids = input_ids[0].tolist()
    last_video = max(i for i, t in enumerate(ids) if t == video_id)
    third_start = [i for i, t in enumerate(ids) if t == im_start_id][2]
    return list(range(last_video + 2, third_start - 2))


def _run_with_deltas(vanilla, batch, token_id, delta_of_layer):
    """The unpatched model with `delta_of_layer[k](hidden at the tokens, hidden)` added at `token_id` before layer k."""
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


@pytest.mark.parametrize("config_name", ["static", "adaptive_cross", "tower"])
def test_llm_injection_on_video_equals_the_computation_by_hand(config_name):
    batch = video_batch(frames=3)
    vanilla = tiny_model()
    config = CONFIGS[config_name]
    model = patch_llava(copy.deepcopy(vanilla), config)
    stack = model.model.manager
    randomise(stack)
    video_id = vanilla.config.video_token_id
    with torch.no_grad():
        features = _pooled_layers_by_hand(vanilla, stack, batch["pixel_values_videos"], config.vision_layers)
        query = _instruction_by_hand(batch["input_ids"], video_id, im_start_id=1)
        deltas = {}
        for layer, manager in zip(stack.config.llm_layers, stack.managers):
            if config_name == "static":
                used = manager.layer_scores.shape[0]  # N - 1 at LLM layer 0, as released
                deltas[layer] = lambda at, whole, w=manager.layer_scores, used=used: (features[:, :used] * w).sum(1)
            elif config_name == "tower":
                from test_aggregators import tower_by_hand

                deltas[layer] = lambda at, whole, m=manager: tower_by_hand(m, features)
            elif layer == 0:  # the adaptive types' layer-0 Manager is static
                deltas[layer] = lambda at, whole, m=manager: (features[:, :-1] * m.layer_scores).sum(1)
            else:

                def adaptive(at, whole, m=manager):
                    tokens = at.shape[0]
                    context = QueryContext(
                        hidden=at,
                        query_hidden=whole[query],
                        token_sample=torch.zeros(tokens, dtype=torch.long),
                        query_sample=torch.zeros(len(query), dtype=torch.long),
                        query_last=torch.tensor([len(query) - 1]),
                        query_segments=[(0, len(query))],
                    )
                    return m(features, context)

                deltas[layer] = adaptive
        expected = _run_with_deltas(vanilla, batch, video_id, deltas)
    got = logits(model, batch)
    assert (got - logits(vanilla, batch)).abs().max() > 1e-3  # the Managers act on the video tokens
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_projector_injection_on_video_equals_the_computation_by_hand():
    batch = video_batch(frames=3)
    vanilla = tiny_model()
    config = CONFIGS["projector"]
    model = patch_llava(copy.deepcopy(vanilla), config)
    stack = model.model.manager
    randomise(stack)
    with torch.no_grad():
        frames = batch["pixel_values_videos"].flatten(0, 1)
        hidden_states = vanilla.model.vision_tower(frames, output_hidden_states=True).hidden_states
        layers = torch.stack([hidden_states[v] for v in config.vision_layers], dim=-2) + stack.layer_embedding.weight
        residual = (layers * stack.managers[0].layer_scores).sum(-2)  # (F, P, C): every frame
        hook = vanilla.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: (args[0] + residual,))
        expected = logits(vanilla, batch)
        hook.remove()
    got = logits(model, batch)
    assert (got - logits(vanilla, batch)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- batches, switches, generate -------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name", ["static", "adaptive_cross", "projector"])
def test_a_mixed_batch_gives_each_sample_what_it_gets_alone(config_name):
    """Image, video, text-only and image + video samples in one forward: each sample's logits equal its own forward
    (the merged image and video positions line up with their features)."""
    processor = tiny_processor()
    batch = mixed_media_batch(processor)
    model = patch_llava(tiny_model(), CONFIGS[config_name])
    randomise(model.model.manager)
    together = logits(model, batch)
    from inputs import picture, prompt

    alone = [
        processor(
            images=[picture(50, 30)], text=prompt(processor, "What color is the circle?", 1), return_tensors="pt"
        ),
        processor(videos=[clip(4)], text=video_prompt(processor, "Where does the square move?"), return_tensors="pt"),
        processor(text=prompt(processor, "Count to three.", 0), return_tensors="pt"),
        processor(
            images=[picture(40, 70, "green", 1)],
            videos=[clip(4, seed=1)],
            text=video_prompt(processor, "Is the circle in the video?", images=1),
            return_tensors="pt",
        ),
    ]
    for index, single in enumerate(alone):
        length = single["input_ids"].shape[1]
        torch.testing.assert_close(together[index, -length:], logits(model, single)[0], atol=1e-4, rtol=1e-4)


def test_video_false_leaves_video_tokens_alone():
    config = ManagerConfig(vision_layers=[1, 2, 3], llm_layers=[0, 1, 3], video=False)
    model, vanilla = tiny_model(), tiny_model()
    patch_llava(model, config)
    randomise(model.model.manager)
    assert "get_video_features" not in model.model.__dict__
    assert torch.equal(logits(model, video_batch()), logits(vanilla, video_batch()))
    image = single_image_batch()
    assert not torch.equal(logits(model, image), logits(vanilla, image))  # images still managed
    assert model.config.manager["video"] is False


def test_text_only_training_still_reaches_every_manager_with_video_enabled():
    model = patch_llava(tiny_model(), CONFIGS["static"])
    randomise(model.model.manager)
    model.train()
    batch = text_only_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.model.manager.parameters())


@pytest.mark.parametrize("config_name", ["static", "adaptive_cross"])
def test_video_training_sends_gradients_to_every_manager(config_name):
    model = patch_llava(tiny_model(), CONFIGS[config_name])
    randomise(model.model.manager)
    model.train()
    batch = video_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, parameter in model.model.manager.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config_name", ["static", "adaptive_cross"])
def test_generate_with_video(config_name):
    model = patch_llava(tiny_model(), CONFIGS[config_name])
    randomise(model.model.manager)
    batch = video_batch()
    greedy = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False), greedy)
    # the first new token is the prefill's argmax: the Managers acted in generate's prefill
    assert greedy[0, batch["input_ids"].shape[1]] == logits(model, batch)[0, -1].argmax()
    beams = model.generate(**batch, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 2
