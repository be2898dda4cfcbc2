"""Video training data: LLaVA-Video records, exact frame sampling, checks that fail early, bad videos, the dummy
video that keeps ZeRO-3 ranks in step, modality lengths, and a mixed image / video / text run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inputs import clip, write_mp4
from train_helpers import (
    ZERO3_PARTITIONED,
    eval_logits,
    image_file,
    keep_torch_threads,
    reload_trained,
    shapes_data,
    tiny_recipe,
    write_records,
)

from llava_manager.media import load_video
from llava_manager.testing.tiny import tiny_config, tiny_processor
from llava_manager.train.collator import ManagerDataCollator, make_dummy_image, make_dummy_video
from llava_manager.train.data import ConversationEncoder, DataError, SupervisedDataset, load_samples

_threads = pytest.fixture(autouse=True)(keep_torch_threads)
CONFIG = tiny_config()
SYSTEM = "You are a helpful assistant."


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(CONFIG)


def encoder_for(processor, frames=4, max_length=4096):
    return ConversationEncoder(
        processor,
        CONFIG.image_token_index,
        "qwen_1_5",
        SYSTEM,
        max_length,
        video_token_id=CONFIG.video_token_index,
        video_frames=frames,
    )


def frame_folder(folder, video) -> str:
    """Write `video` (F, H, W, 3) as PNG frames (lossless); returns the folder's name."""
    from PIL import Image

    folder.mkdir(parents=True)
    for k, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"{k:04d}.png")
    return folder.name


def video_record(video: str, question="<image>\nWhat shape is in the picture?", answer="A red circle.", **extra):
    return {
        "id": extra.pop("id", "v"),
        "video": video,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }


def chatml(user: str, answer: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )


@pytest.mark.parametrize("frames, picks", [(6, [0, 1, 1, 2, 2, 3]), (2, [0, 3]), (4, [0, 1, 2, 3])])
def test_a_video_sample_encodes_as_the_processor_would(tmp_path, processor, frames, picks):
    """Tokens and pixels equal the HF processor's on the same text and the frames exact sampling picks (short clips
    repeat frames); the `<image>` of LLaVA-Video data marks the video; the loss is on the answer only."""
    video = clip(4, size=40)
    name = frame_folder(tmp_path / "videos" / "clip", video)
    data = write_records(tmp_path, [video_record(name, question="What shape is in the picture?\n<image>")])
    sample = load_samples(data, None, video_folder=tmp_path / "videos", video_frames=frames).samples[0]
    item = encoder_for(processor, frames).encode(sample)

    expected = processor(
        text=chatml("<video>\nWhat shape is in the picture?", "A red circle."),
        videos=[video[picks]],
        return_tensors="pt",
    )
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["pixel_values_videos"], expected["pixel_values_videos"])
    assert item["pixel_values"] is None
    assert item["pixel_values_videos"].shape[:2] == (1, len(picks))
    trained = item["labels"][item["labels"] != -100]
    assert processor.tokenizer.decode(trained) == "A red circle.<|im_end|>"


def test_an_image_and_a_video_in_one_sample_keep_their_order(tmp_path, processor):
    name = frame_folder(tmp_path / "videos" / "clip", clip(3, size=40))
    picture = image_file(tmp_path / "images", "a.png")
    record = video_record(name, question="<video>\nAnd <image>\nWhat color is the shape?", image=picture)
    data = write_records(tmp_path, [record])
    sample = load_samples(data, tmp_path / "images", video_folder=tmp_path / "videos", video_frames=3).samples[0]
    item = encoder_for(processor, frames=3).encode(sample)
    from PIL import Image

    expected = processor(
        text=chatml("<video>\nAnd <image>\nWhat color is the shape?", "A red circle."),
        images=[Image.open(tmp_path / "images" / picture).convert("RGB")],
        videos=[load_video(tmp_path / "videos" / name, 3, exact=True)],
        return_tensors="pt",
    )
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["pixel_values"], expected["pixel_values"])
    assert torch.equal(item["pixel_values_videos"], expected["pixel_values_videos"])


def test_an_mp4_is_decoded_and_sampled_exactly(tmp_path, processor):
    pytest.importorskip("av")
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "clip.mp4", clip(8, size=48))
    data = write_records(tmp_path, [video_record("clip.mp4")])
    sample = load_samples(data, None, video_folder=tmp_path / "videos", check_videos="open").samples[0]
    assert sample.video == str(tmp_path / "videos" / "clip.mp4")
    for frames in (5, 12):  # fewer than the file has, more (repeats)
        item = encoder_for(processor, frames).encode(sample)
        assert item["pixel_values_videos"].shape[:2] == (1, frames)
    decoded = load_video(tmp_path / "videos" / "clip.mp4", 12, exact=True)
    every = load_video(tmp_path / "videos" / "clip.mp4", 100)
    assert len(every) == 8 and np.array_equal(decoded, every[np.linspace(0, 7, 12).round().astype(int)])


@pytest.mark.parametrize(
    "record, message",
    [
        (video_record(["a", "b"]), "'video' must be one path"),
        (video_record("a", question="<image>\n<image>\nWhat?"), "exactly one <video>"),
        (
            {
                "id": "x",
                "conversations": [{"from": "human", "value": "<video>\nHi"}, {"from": "gpt", "value": "Yes."}],
            },
            "1 <video> placeholder\\(s\\) but the sample has no 'video'",
        ),
        (video_record("a", question="<image>\nWhat?", image="a.png"), "0 <video> placeholder"),
        (
            {
                **video_record("a"),
                "conversations": [{"from": "human", "value": "<video>\nHi"}, {"from": "gpt", "value": "<video> Yes."}],
            },
            "exactly one",
        ),
        (
            {
                **video_record("a", question="Hi"),
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<video> Yes."}],
            },
            "may only appear in human turns",
        ),
    ],
)
def test_malformed_video_records_fail_before_training(tmp_path, record, message):
    data = write_records(tmp_path, [record])
    with pytest.raises(DataError, match=message):
        load_samples(data, tmp_path, video_folder=tmp_path, check_images="none", check_videos="none")


def test_a_video_without_video_folder_is_refused(tmp_path):
    data = write_records(tmp_path, [video_record("clip")])
    with pytest.raises(DataError, match="sets no video_folder"):
        load_samples(data, None)


def test_bad_videos_error_or_are_skipped_and_counted(tmp_path, processor):
    videos = tmp_path / "videos"
    good = frame_folder(videos / "good", clip(3, size=40))
    (videos / "empty").mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    records = [
        video_record(good, id="good"),
        video_record("gone", id="gone"),
        video_record("empty", id="empty"),
        video_record("broken.mp4", id="broken"),
    ]
    data = write_records(tmp_path, records)
    with pytest.raises(DataError, match=r"1 sample\(s\) have missing or unreadable videos.*on_bad_video: skip"):
        load_samples(data, None, video_folder=videos)
    loaded = load_samples(data, None, video_folder=videos, on_bad_video="skip")  # stat only: 'empty', 'broken' pass
    assert [s.id for s in loaded.samples] == ["good", "empty", "broken"] and loaded.skipped == [
        f"gone: video {videos / 'gone'} is missing"
    ]
    opened = load_samples(data, None, video_folder=videos, check_videos="open", on_bad_video="skip")
    assert [s.id for s in opened.samples] == ["good"]
    assert [line.split(":")[0] for line in opened.skipped] == ["gone", "empty", "broken"]
    assert "holds no frame images" in opened.skipped[1]

    # found only while training: 'error' stops with the path, 'skip' replaces the sample and counts it
    encoder = encoder_for(processor, frames=3)
    strict = SupervisedDataset(loaded.samples, encoder)
    with pytest.raises(DataError, match="holds no frame images.*on_bad_video: skip"):
        strict[1]
    lenient = SupervisedDataset(loaded.samples, encoder, on_bad_video="skip")
    item = lenient[1]
    assert item["sample_id"] == "good" and [d.split(":")[0] for d in item["dropped"]] == ["empty", "broken"]
    assert sum(lenient.drop_report().values()) == 2


def test_mixture_entries_take_their_own_video_folder(tmp_path):
    name = frame_folder(tmp_path / "clips" / "c1", clip(2, size=40))
    write_records(tmp_path, [video_record(name)], "videos.json")
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - json_path: videos.json\n    video_folder: clips\n")
    samples = load_samples(mixture, None).samples
    assert samples[0].video == str(tmp_path / "clips" / "c1")
    mixture.write_text("datasets:\n  - json_path: videos.json\n    video_folder: nowhere\n")
    with pytest.raises(DataError, match="video_folder 'nowhere' is not a folder"):
        load_samples(mixture, None)


def test_modality_lengths_put_videos_with_media_and_above_images(tmp_path):
    data, images = shapes_data(tmp_path, 6, kinds=("single", "video", "text"))
    samples = load_samples(data, images, video_folder=tmp_path / "videos", video_frames=32).samples
    single, video, text = (s.modality_length for s in samples[:3])
    assert text < 0 < single < video
    assert video >= 32 * 196  # the video's token count dominates its length


@pytest.mark.parametrize("patched", [False, True])
def test_a_batch_without_video_gets_a_masked_dummy_video(tmp_path, processor, tiny_model, patched):
    """With video data, batches without a video get a one-frame blank video on masked positions: every module runs
    (ZeRO-3 ranks stay in step), and no real token's logits or the loss change, Managers included."""
    if patched:
        from llava_manager import ManagerConfig, patch_llava

        tiny_model = patch_llava(tiny_model, ManagerConfig(llm_layers=[0, 2]))
        with torch.no_grad():
            for param in tiny_model.model.manager.parameters():
                param.normal_()
    data, images = shapes_data(tmp_path, 4, kinds=("single", "text"))
    dataset = SupervisedDataset(load_samples(data, images).samples, encoder_for(processor))
    items = [dataset[i] for i in range(3)]
    pad, image_id = processor.tokenizer.pad_token_id, CONFIG.image_token_index
    dummy_image = make_dummy_image(dataset.encoder)
    dummy_video = make_dummy_video(dataset.encoder)
    plain = ManagerDataCollator(pad, image_id, dummy_image)(items)
    safe = ManagerDataCollator(pad, image_id, dummy_image, CONFIG.video_token_index, dummy_video)(items)
    assert "pixel_values_videos" not in plain and safe["pixel_values_videos"].shape[:2] == (1, 1)
    assert int((safe["input_ids"] == CONFIG.video_token_index).sum()) == dummy_video["num_tokens"]
    for batch in (plain, safe):
        batch.pop("dropped_samples")
    calls = []
    handle = tiny_model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        a, b = tiny_model(**plain), tiny_model(**safe)
    handle.remove()
    assert len(calls) == 3  # images (plain), images + the dummy video (safe)
    length = plain["input_ids"].shape[1]
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(a.logits[real], b.logits[:, :length][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)


def test_videos_with_different_frame_counts_cannot_share_a_batch(tmp_path, processor):
    first = {
        "input_ids": torch.ones(3, dtype=torch.long),
        "labels": torch.ones(3, dtype=torch.long),
        "pixel_values_videos": torch.zeros(1, 2, 3, 32, 32),
    }
    second = {**first, "pixel_values_videos": torch.zeros(1, 3, 3, 32, 32)}
    with pytest.raises(ValueError, match=r"videos with \[2, 3\] frames in one batch"):
        ManagerDataCollator(0, CONFIG.image_token_index)([first, second])


def test_a_mixed_image_video_text_run_trains_every_manager_parameter(tmp_path):
    """The tiny recipe on single-image, video and text-only samples (batches of 3: every batch has all three)."""
    from llava_manager.train.main import train

    recipe = tiny_recipe(
        tmp_path,
        "--frames_upbound",
        "3",
        "--video_folder",
        str(tmp_path / "data" / "videos"),
        "--per_device_train_batch_size",
        "3",
        "--max_steps",
        "4",
        n=12,
        kinds=("single", "video", "text"),
    )
    result = train(recipe)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    batch = result.trainer.data_collator([result.trainer.train_dataset[i] for i in range(3)])
    assert batch["pixel_values_videos"].shape[:2] == (1, 3) and batch["pixel_values"].shape[0] == 1
    manager = result.trainer.model.model.manager
    scores = [p for n, p in manager.named_parameters() if "layer_embedding" not in n]
    assert scores and all(p.abs().sum() > 0 for p in scores)  # trained from zero


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_mixed_batch_trains_under_deepspeed_and_reloads(tmp_path, zero):
    """Every batch holds an image sample, a video sample and a text-only sample, under ZeRO-2 and (really
    partitioned) ZeRO-3 in one process; the saved model gives the engine's logits on a mixed batch."""
    from llava_manager.train.main import train

    extra = ["--deepspeed", "zero2"] if zero == "zero2" else ZERO3_PARTITIONED
    recipe = tiny_recipe(
        tmp_path,
        *extra,
        "--frames_upbound",
        "3",
        "--video_folder",
        str(tmp_path / "data" / "videos"),
        "--per_device_train_batch_size",
        "3",
        "--max_steps",
        "3",
        n=9,
        kinds=("single", "video", "text"),
    )
    result = train(recipe)
    trainer = result.trainer
    assert trainer.model_wrapped.zero_optimization_stage() == (2 if zero == "zero2" else 3)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    batch.pop("dropped_samples")
    assert "pixel_values_videos" in batch and "pixel_values" in batch
    in_memory = eval_logits(trainer.model_wrapped, batch)
    torch.testing.assert_close(eval_logits(reload_trained(result.output_dir), batch), in_memory, atol=0, rtol=0)


def test_video_data_needs_a_video_processor(tmp_path, monkeypatch):
    from llava_manager.train.main import build_trainer
    from llava_manager.train.recipe import RecipeError

    recipe = tiny_recipe(
        tmp_path, "--video_folder", str(tmp_path / "data" / "videos"), n=3, kinds=("single", "video", "text")
    )
    import llava_manager.train.main as main

    original = main.configure_images

    def without_video_processor(*args, **kwargs):
        processor, layout = original(*args, **kwargs)
        processor.video_processor = None
        return processor, layout

    monkeypatch.setattr(main, "configure_images", without_video_processor)
    with pytest.raises(RecipeError, match=r"no video processor.*llava-manager\[video\]"):
        build_trainer(recipe)
