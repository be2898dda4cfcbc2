"""Managers on LLaVA-OV's video path: identity at init, the video logits against an independent computation
(transformers' pooling of each projected layer, the Manager sum added by hand), mixed image / video / text batches,
`video=False`, and generate."""

import copy

import pytest
import torch
from inputs import clip, mixed_media_batch, single_image_batch, text_only_batch, video_batch, video_prompt, write_mp4
from test_aggregators import randomise, run_with_deltas
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
        expected = run_with_deltas(vanilla, batch, video_id, deltas)
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


# ---- video files and frame folders: chat --video --------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_patched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-model") / "model"
    model = patch_llava(tiny_model(), CONFIGS["static"])
    randomise(model.model.manager)
    model.save_pretrained(folder)
    tiny_processor(model.config).save_pretrained(folder)
    return folder


def test_load_video_samples_frames_uniformly_from_files_and_folders(tmp_path):
    import numpy as np

    from llava_manager.chat import load_video

    video = np.stack([np.full((48, 48, 3), 20 + 25 * i, dtype=np.uint8) for i in range(8)])  # frame i: grey 20+25i
    decoded = load_video(write_mp4(tmp_path / "clip.mp4", video), num_frames=4)
    assert decoded.shape == (4, 48, 48, 3) and decoded.dtype.name == "uint8"
    levels = (decoded.reshape(4, -1).mean(-1) - 20) / 25  # which frame each decoded one is (lossy: about)
    assert np.abs(levels - [0, 2, 5, 7]).max() < 0.3  # uniform over 0..7: 0, 2.33, 4.67, 7, rounded
    assert load_video(tmp_path / "clip.mp4", num_frames=32).shape[0] == 8  # never more frames than the video has

    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"frame-{index:03d}.png")
    assert (load_video(folder, num_frames=3) == video[[0, 4, 7]]).all()  # lossless: the very frames


def test_chat_answers_about_a_video(saved_patched, tmp_path, capsys):
    from llava_manager.cli import main

    video = clip(6)
    path = write_mp4(tmp_path / "clip.mp4", video)
    command = ["chat", str(saved_patched), "--video", str(path), "--frames", "4", "--max-new-tokens", "4"]
    assert main([*command, "--no-stream", "Where does the square move?"]) == 0
    answer = capsys.readouterr().out.strip()
    # by hand: the decoded frames, the saved processor's chat template, greedy generate
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_manager.chat import load_video

    model = AutoModelForImageTextToText.from_pretrained(saved_patched).eval()
    processor = AutoProcessor.from_pretrained(saved_patched)
    inputs = processor(
        videos=[load_video(path, 4)],
        text=video_prompt(processor, "Where does the square move?"),
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 4 + 1
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == expected


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing.mp4", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no frame images"),
        (lambda tmp: (tmp / "bad.mp4").write_bytes(b"not a video") and tmp / "bad.mp4", "cannot decode video"),
    ],
)
def test_chat_refuses_a_bad_video_before_loading_the_model(make, message, saved_patched, tmp_path, capsys):
    from llava_manager.cli import main

    path = make(tmp_path)
    assert main(["chat", str(saved_patched), "--video", str(path), "What happens?"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("llava-manager chat: error:")


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_the_processor_counts_the_video_tokens_the_model_fills(frames):
    processor = tiny_processor()
    model = patch_llava(tiny_model(), CONFIGS["static"])
    batch = video_batch(processor, frames=frames)
    with torch.no_grad():
        output = model.model.get_video_features(batch["pixel_values_videos"])
    tokens = int((batch["input_ids"] == model.config.video_token_id).sum())
    assert tokens == frames * 4 + 1 == output.deepstack_features[0][0].shape[0]
    logits(model, batch)  # and the forward accepts them
