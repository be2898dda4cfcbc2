"""The processor of converted checkpoints: its image-token counts equal the patched model's image features for
every layout (square, anyres with the original's truncating unpad, anyres_max_9), its crops equal the original
preprocessing bit for bit, and it round-trips through AutoProcessor."""

import functools
import json
import random

import numpy as np
import pytest
import torch
from hub_stand_in import IMAGE_ID, ORACLE_DIR, VIDEO_ID, oracle_prompt, oracle_tokenizer, write_checkpoint
from oracle_cases import CASES, load_case, pixel_crops
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionProcessor, PreTrainedTokenizerFast
from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

import llava_manager
from llava_manager.chat_format import CHAT_TEMPLATE
from llava_manager.checkpoint.assembly import build_processor, prepare_tokenizer
from llava_manager.config import ManagerError
from llava_manager.errors import ConversionError
from llava_manager.processor import LlavaOnevisionManagerImageProcessor, LlavaOnevisionManagerProcessor

STAGE_1_5_PINPOINTS_WH = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
ODD_SIZES_WH = [(500, 300), (1500, 1100), (300, 2000)]


@functools.cache
def converted(layout: str):
    """(model, processor) converted from an oracle checkpoint, in one of the released image modes."""
    import tempfile
    from pathlib import Path

    case = {
        "square": "static_square",
        "anyres": "anyres_max9_downsample",
        "anyres_max_9": "anyres_max9_downsample",
        "anyres_max_9 stage 1.5": "static_all_anyres",
    }[layout]
    folder = write_checkpoint(case, Path(tempfile.mkdtemp()) / case, tokenizer=False)
    if layout == "anyres":  # the stage-1.5 mode: AnyRes grids without the anyres_max shrink
        config = json.loads((folder / "config.json").read_text())
        config["image_aspect_ratio"] = "anyres"
        (folder / "config.json").write_text(json.dumps(config))
    (folder.parent / "tiny-siglip-patch14-384").symlink_to(ORACLE_DIR / "tiny-siglip-patch14-384")
    model = llava_manager.load_original(folder, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    return model, build_processor(model.config, prepare_tokenizer(oracle_tokenizer()))


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def model_token_counts(model, inputs) -> list[int]:
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images")
        )
    return [f.shape[0] for f in features.pooler_output]


@pytest.mark.parametrize("size_wh", ODD_SIZES_WH, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["square", "anyres", "anyres_max_9"])
def test_token_counts_equal_the_models_image_features(layout, size_wh):
    model, processor = converted(layout)
    inputs = processor(images=random_image(*size_wh), text="<image>\n t40", return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert [image_tokens] == model_token_counts(model, inputs)
    if layout == "square":
        assert image_tokens == 729 and tuple(inputs["pixel_values"].shape) == (1, 1, 3, 384, 384)


def test_processor_output_runs_through_the_model():
    """transformers itself checks that the image tokens and the image features agree."""
    for layout in ("square", "anyres", "anyres_max_9"):
        model, processor = converted(layout)
        inputs = processor(images=random_image(300, 500), text="<image>\n t40 t41", return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[1] == inputs["input_ids"].shape[1]


def test_the_original_truncating_unpad_is_counted():
    """oracle case unpad_float_edge: the original keeps 11 columns (1701 tokens), transformers' rounding 13 (1863)."""
    model, processor = converted("anyres_max_9 stage 1.5")
    case = load_case("unpad_float_edge")
    image = Image.open(ORACLE_DIR / "unpad_float_edge" / case.meta["image_files"][0]).convert("RGB")
    inputs = processor(images=image, text="<image>", return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == model_token_counts(model, inputs)[0] == 1701
    assert processor._get_number_of_features(1269, 188, 384, 384) == 1701
    rounding = LlavaOnevisionProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    assert rounding._get_number_of_features(1269, 188, 384, 384) == 1863


def test_rounding_layout_counts_like_transformers():
    """With transformers' own layout (unpad="round") the counts are transformers' (36 pinpoints, random sizes)."""
    _, processor = converted("anyres_max_9")
    ours = LlavaOnevisionManagerProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_layout={"mode": "anyres", "unpad": "round"},
    )
    theirs = LlavaOnevisionProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    rng = random.Random(0)
    sizes = [(rng.randint(16, 3000), rng.randint(16, 3000)) for _ in range(300)] + [(163, 163), (820, 369), (748, 792)]
    for height, width in sizes:
        assert ours._get_number_of_features(height, width, 384, 384) == theirs._get_number_of_features(
            height, width, 384, 384
        ), (height, width)


@pytest.mark.parametrize("name", [c for c in CASES if c != "batch2_static_all"])
def test_crops_equal_the_original_preprocessing_bit_for_bit(name):
    case = load_case(name)
    layout = "square" if case.meta["settings"]["image_aspect_ratio"] == "square" else "anyres_max_9 stage 1.5"
    if case.meta["settings"]["image_grid_pinpoints"] != STAGE_1_5_PINPOINTS_WH and layout != "square":
        layout = "anyres_max_9"
    _, processor = converted(layout)
    image = Image.open(ORACLE_DIR / name / case.meta["image_files"][0]).convert("RGB")
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(pixel_values, pixel_crops(case, 0))


def test_multi_image_samples():
    """Several images in one sample: one crop each; square -> 729 tokens, anyres -> 729 + a newline (transformers)."""
    for layout, per_image in (("square", 729), ("anyres_max_9", 730)):
        model, processor = converted(layout)
        images = [[random_image(500, 300, 1), random_image(300, 2000, 2)]]
        inputs = processor(images=images, text="<image>\n<image>\n t40", return_tensors="pt")
        assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 2 * per_image
        assert model_token_counts(model, inputs) == [per_image, per_image]


def test_pad_mode_is_the_originals_expand2square():
    image = random_image(50, 20)
    processor = LlavaOnevisionManagerImageProcessor(size={"height": 32, "width": 32}, crop_mode="pad")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 1, 3, 32, 32)
    square = Image.new("RGB", (50, 50), (127, 127, 127))  # expand2square with the mean colour int(0.5 * 255)
    square.paste(image, (0, (50 - 20) // 2))
    expected = LlavaOnevisionManagerImageProcessor(size={"height": 32, "width": 32}, crop_mode="square")(
        images=square, return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(pixel_values, expected)


def test_pinpoints_keep_the_originals_order():
    """A 300x300 image ties between (w, h) = (384, 768) and (768, 384); the original takes the first (2 rows)."""
    _, processor = converted("anyres_max_9 stage 1.5")
    assert processor.image_processor.image_grid_pinpoints == [[h, w] for w, h in STAGE_1_5_PINPOINTS_WH]
    image = Image.new("RGB", (300, 300), (255, 255, 255))
    crops = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert crops.shape[0] == 3  # base + 2 grid crops
    top = crops[1]  # the image (white) fills the lower part of the upper crop; black padding above it
    assert (top[:, :100] == -1).all() and (top[:, -100:] == 1).all()


def test_chat_template_is_qwen_1_5():
    _, processor = converted("square")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation.insert(0, {"role": "system", "content": "Be brief."})
    assert processor.apply_chat_template(conversation).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user"
    )


def test_chat_template_reproduces_the_oracle_prompt_ids():
    _, processor = converted("anyres_max_9 stage 1.5")
    case = load_case("static_all_anyres")
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": oracle_prompt(case.meta["input_ids"][0][16:24])}],
        }
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == oracle_prompt(case.meta["input_ids"][0])
    ids = processor.tokenizer(prompt)["input_ids"]
    assert [IMAGE_ID if i == -200 else i for i in case.meta["input_ids"][0]] == ids


def test_round_trip_through_auto_processor(tmp_path):
    model, processor = converted("square")
    processor.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaOnevisionManagerProcessor
    assert type(loaded.image_processor) is LlavaOnevisionManagerImageProcessor  # PIL class for every backend
    assert loaded.image_layout == processor.image_layout == {"mode": "square", "unpad": "truncate"}
    assert loaded.image_processor.crop_mode == "square"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.chat_template == CHAT_TEMPLATE
    image = random_image(500, 300)
    a, b = processor(images=image, text="<image> t40"), loaded(images=image, text="<image> t40")
    assert a["input_ids"] == b["input_ids"] and np.array_equal(a["pixel_values"], b["pixel_values"])


def test_tokenizer_gains_image_and_video_tokens():
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    prepared = prepare_tokenizer(tokenizer, {"vocab_size": 8})
    assert prepared.convert_tokens_to_ids(["<image>", "<video>"]) == [4, 5]  # after the vocabulary, like Qwen2's
    assert "<image>" not in tokenizer.get_vocab()  # the caller's tokenizer is left alone
    with pytest.raises(ConversionError, match="do not fit the model's 5-row embedding"):
        prepare_tokenizer(tokenizer, {"vocab_size": 5})


def test_folder_without_tokenizer_files_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"no tokenizer files.*pass tokenizer="):
        prepare_tokenizer(tmp_path)


def test_bad_settings_are_refused():
    _, processor = converted("anyres_max_9")
    with pytest.raises(ManagerError, match="crop_mode='tiles' is invalid"):
        LlavaOnevisionManagerImageProcessor(crop_mode="tiles")
    with pytest.raises(ManagerError, match="does not fit the image processor's crop_mode"):
        LlavaOnevisionManagerProcessor(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            video_processor=processor.video_processor,
            num_image_tokens=729,
            image_layout={"mode": "square", "unpad": "truncate"},
        )
    with pytest.raises(ManagerError, match="anyres_9"):
        LlavaOnevisionManagerProcessor(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            video_processor=processor.video_processor,
            num_image_tokens=729,
            vision_aspect_ratio="anyres_9",
        )


def test_the_pil_image_processor_is_the_exact_one():
    """transformers' torchvision image processor differs from the original crops; ours is the PIL one."""
    assert issubclass(LlavaOnevisionManagerImageProcessor, LlavaOnevisionImageProcessorPil)


def test_qwen2_style_tokenizer_files(tmp_path):
    """The released folders carry Qwen2's files (vocab.json, merges.txt, added_tokens.json) beside an original
    config.json saying model_type "qwen2": <image> / <video> are appended after <|im_end|>, as in llava-hf."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["You are a helpful assistant. What is shown in the image?"] * 20, vocab_size=280)
    bpe.save_model(str(tmp_path))
    n = len(json.loads((tmp_path / "vocab.json").read_text()))
    specials = {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}
    (tmp_path / "added_tokens.json").write_text(json.dumps(specials))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "padding_side": "right",
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in specials.items()},
            }
        )
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["LlavaQwenForCausalLM"]})
    )
    tokenizer = prepare_tokenizer(tmp_path, {"vocab_size": n + 16})
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<image>", "<video>"]) == [
        n + 1,
        n + 2,
        n + 3,
        n + 4,
    ]
    text = "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == n + 1 and ids.count(n + 3) == 1 and tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded(text)["input_ids"] == ids and reloaded.padding_side == "left"
