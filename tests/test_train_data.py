"""Training data: loading, checks that fail early, ChatML labels, truncation, collation, sampling."""

from __future__ import annotations

import pytest
import torch
from train_helpers import image_file, keep_torch_threads, shapes_data, write_records

from llava_manager.testing.tiny import tiny_config, tiny_processor
from llava_manager.train.collator import ManagerDataCollator, make_dummy_image
from llava_manager.train.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    DataError,
    DropSample,
    SupervisedDataset,
    load_samples,
)
from llava_manager.train.sampler import modality_length_grouped_indices

_threads = pytest.fixture(autouse=True)(keep_torch_threads)


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(tiny_config())


def encoder_for(processor, max_length=512, template="qwen_1_5"):
    return ConversationEncoder(
        processor, tiny_config().image_token_index, template, "You are a helpful assistant.", max_length
    )


def _runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of trained label ids."""
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs + ([current] if current else [])


def test_labels_only_on_answers(tmp_path, processor):
    name = image_file(tmp_path / "img", "a.png")
    data = write_records(
        tmp_path,
        [
            {
                "id": "s1",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "What color is the shape?\n<image>"},  # moved to the front, as LLaVA
                    {"from": "gpt", "value": "The circle is red."},
                    {"from": "human", "value": "What shape is it?"},
                    {"from": "gpt", "value": "A circle."},
                ],
            }
        ],
    )
    sample = load_samples(data, tmp_path / "img").samples[0]
    item = encoder_for(processor).encode(sample)
    tokenizer = processor.tokenizer
    answers = [tokenizer.decode(run) for run in _runs(item["labels"])]
    assert answers == ["The circle is red.<|im_end|>", "A circle.<|im_end|>"]
    # the whole prompt, image tokens collapsed: Qwen ChatML with the image first in its turn
    ids = item["input_ids"].tolist()
    image_id = tiny_config().image_token_index
    collapsed = [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]
    assert tokenizer.decode(collapsed) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat color is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
        "<|im_start|>user\nWhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA circle.<|im_end|>\n"
    )
    # the processor's own count of image tokens (64x48 image, anyres)
    assert ids.count(image_id) == len(
        processor.replace_image_token(
            processor.image_processor([[__import__("PIL").Image.open(tmp_path / "img" / name)]], return_tensors="pt"),
            0,
        )
    ) // len(processor.image_token)
    # labels agree with input_ids wherever they are set
    mask = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][mask], item["input_ids"][mask])


def test_plain_template_trains_caption_only(tmp_path, processor):
    name = image_file(tmp_path / "img", "a.png")
    data = write_records(
        tmp_path,
        [
            {
                "id": "c",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": "A red circle."},
                ],
            }
        ],
    )
    item = encoder_for(processor, template="plain").encode(load_samples(data, tmp_path / "img").samples[0])
    tokenizer = processor.tokenizer
    assert [tokenizer.decode(r) for r in _runs(item["labels"])] == ["A red circle.\n"]
    assert "Describe" not in tokenizer.decode(item["input_ids"])


def test_batches_match_the_model(tmp_path, processor, tiny_model):
    """Single-image, multi-image and text-only samples collate into a batch the model accepts."""
    data, images = shapes_data(tmp_path, 6)
    dataset = SupervisedDataset(load_samples(data, images).samples, encoder_for(processor))
    encoder = dataset.encoder
    collator = ManagerDataCollator(
        processor.tokenizer.pad_token_id, tiny_config().image_token_index, make_dummy_image(encoder)
    )
    batch = collator([dataset[i] for i in range(6)])
    assert batch["batch_num_images"].tolist() == [1, 2, 0, 1, 2, 0]
    batch.pop("dropped_samples")
    with torch.no_grad():
        out = tiny_model(**batch)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("patched", [False, True])
def test_text_only_batch_gets_a_masked_dummy_image(tmp_path, processor, tiny_model, patched):
    if patched:  # Managers with non-zero weights add to the dummy's image positions only
        from llava_manager import ManagerConfig, patch_llava

        tiny_model = patch_llava(tiny_model, ManagerConfig(llm_layers=[0, 2]))
        with torch.no_grad():
            for param in tiny_model.model.manager.parameters():
                param.normal_()
    data, images = shapes_data(tmp_path, 4, kinds=("text",))
    dataset = SupervisedDataset(load_samples(data, images).samples, encoder_for(processor))
    dummy = make_dummy_image(dataset.encoder)
    items = [dataset[i] for i in range(3)]
    plain = ManagerDataCollator(processor.tokenizer.pad_token_id, tiny_config().image_token_index, None)(items)
    safe = ManagerDataCollator(processor.tokenizer.pad_token_id, tiny_config().image_token_index, dummy)(items)
    assert "pixel_values" not in plain and safe["pixel_values"].shape[0] == 1
    assert int((safe["attention_mask"] == 0).sum()) >= dummy["num_tokens"]
    for batch in (plain, safe):
        batch.pop("dropped_samples")
    with torch.no_grad():
        a, b = tiny_model(**plain), tiny_model(**safe)
    length = plain["input_ids"].shape[1]
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(a.logits[real], b.logits[:, :length][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)


def test_truncation_drops_samples_whose_image_tokens_would_be_cut(tmp_path, processor):
    data, images = shapes_data(tmp_path, 3, kinds=("single", "text", "text"))
    samples = load_samples(data, images).samples
    encoder = encoder_for(processor, max_length=40)  # the single image alone has more than 40 tokens
    with pytest.raises(DropSample, match="image tokens"):
        encoder.encode(samples[0])
    dataset = SupervisedDataset(samples, encoder)
    item = dataset[0]  # replaced by the next sample, and the drop is reported
    assert item["sample_id"] == samples[1].id
    assert len(item["dropped"]) == 1 and item["dropped"][0].startswith(f"{samples[0].id}: ")
    # text is truncated (not dropped) when the cut falls after every image token and answers remain
    with pytest.raises(DropSample, match="no answer token"):  # a cut before the first answer: dropped too
        encoder_for(processor, max_length=20).encode(samples[1])
    full = encoder_for(processor).encode(samples[1])
    n = full["input_ids"].numel()
    cut = encoder_for(processor, max_length=n - 2).encode(samples[1])
    assert torch.equal(cut["input_ids"], full["input_ids"][: n - 2])


def test_mixture_sampling_strategies(tmp_path):
    records = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
        for i in range(10)
    ]
    write_records(tmp_path, records, "a.json")
    write_records(tmp_path, records, "b.jsonl")
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        "datasets:\n"
        "  - json_path: a.json\n    sampling_strategy: first:30%\n"
        "  - json_path: b.jsonl\n    sampling_strategy: end:2\n"
        "  - json_path: a.json\n    sampling_strategy: random:4\n"
        "  - json_path: b.jsonl\n"
    )
    ids = [s.id for s in load_samples(mixture, None).samples]
    assert ids[:3] == ["t0", "t1", "t2"] and ids[3:5] == ["t8", "t9"]
    assert len(ids) == 3 + 2 + 4 + 10 and len(set(ids[5:9])) == 4
    mixture.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: middle:3\n")
    with pytest.raises(DataError, match=r"datasets\[0\].*sampling_strategy='middle:3'"):
        load_samples(mixture, None)


@pytest.mark.parametrize(
    "record, match",
    [
        (
            {
                "id": "x1",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "No placeholder"}, {"from": "gpt", "value": "Red."}],
            },
            r"id 'x1'.*0 <image> placeholder\(s\) but the sample has 1 image",
        ),
        (
            {
                "id": "x2",
                "image": ["a.png"],
                "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "Red."}],
            },
            r"id 'x2'.*2 <image> placeholder\(s\) but the sample has 1 image",
        ),
        (
            {
                "id": "x3",
                "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "Red."}],
            },
            r"id 'x3'.*1 <image> placeholder\(s\) but the sample has 0 image",
        ),
        (
            {"id": "x4", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "Red."}]},
            r"id 'x4'.*from='robot'",
        ),
        (
            {
                "id": "x5",
                "video": "v.mp4",
                "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "Red."}],
            },
            r"id 'x5'.*sets no video_folder",
        ),
        ({"id": "x6", "conversations": [{"from": "human", "value": "hi"}]}, r"id 'x6'.*no gpt turn"),
    ],
)
def test_bad_samples_name_file_and_id(tmp_path, record, match):
    image_file(tmp_path / "img", "a.png")
    data = write_records(tmp_path, [record])
    with pytest.raises(DataError, match=match) as error:
        load_samples(data, tmp_path / "img")
    assert str(data) in str(error.value)


def test_missing_and_unreadable_images(tmp_path, processor):
    folder = tmp_path / "img"
    image_file(folder, "ok.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."}]
    data = write_records(
        tmp_path,
        [
            {"id": "good", "image": "ok.png", "conversations": conv},
            {"id": "gone", "image": "missing.png", "conversations": conv},
            {"id": "bad", "image": "broken.png", "conversations": conv},
        ],
    )
    with pytest.raises(DataError, match=r"(?s)2 sample\(s\).*id 'gone'.*missing.png is missing.*id 'bad'.*unreadable"):
        load_samples(data, folder, check_images="open")
    loaded = load_samples(data, folder, check_images="open", on_bad_image="skip")
    assert [s.id for s in loaded.samples] == ["good"]
    assert [s.split(":")[0] for s in loaded.skipped] == ["gone", "bad"]
    # found only while training (check_images: exists): error with the sample id, or skip and count
    lazy = load_samples(data, folder, check_images="none").samples
    with pytest.raises(DataError, match=r"id 'bad'.*cannot read image"):
        SupervisedDataset(lazy[2:], encoder_for(processor))[0]
    item = SupervisedDataset(lazy, encoder_for(processor), on_bad_image="skip")[1]
    assert item["sample_id"] == "good" and [d.split(":")[0] for d in item["dropped"]] == ["gone", "bad"]


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "nope.json", None)


def test_modality_grouped_order():
    lengths = [10 + i if i % 3 else -(5 + i) for i in range(40)]  # 13 text-only, 27 with images
    generator = torch.Generator().manual_seed(0)
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=2, generator=generator)
    assert sorted(order) == list(range(40))
    megabatches = [order[i : i + 4] for i in range(0, 40, 4)]
    mixed = [m for m in megabatches if len({lengths[i] > 0 for i in m}) > 1]
    assert len(mixed) <= 1  # only the leftover megabatch mixes modalities
