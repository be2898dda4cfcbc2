"""`llava-manager build`: a fresh LLaVA-OV composed from a SigLIP and a Qwen2 checkpoint, then stage 1 on it, then
chat. The experts are tiny checkpoints built here (no downloads)."""

import json

import pytest
import torch
from inputs import picture
from train_helpers import keep_torch_threads
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_manager.cli import main
from llava_manager.testing.tiny import tiny_tokenizer
from llava_manager.train import train
from llava_manager.train.recipe import load_recipe

_keep_threads = pytest.fixture(autouse=True)(keep_torch_threads)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """(SigLIP folder, Qwen2 folder): a 5-layer SigLIP vision model and a Qwen2 LM whose tokenizer has no <image>."""
    root = tmp_path_factory.mktemp("experts")
    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=5,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    vision.save_pretrained(root / "siglip")
    tokenizer = tiny_tokenizer(media_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),  # no spare rows: <image> / <video> need new ones
            tie_word_embeddings=True,
            eos_token_id=im_end,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    llm.save_pretrained(root / "qwen2")
    tokenizer.save_pretrained(root / "qwen2")
    return root / "siglip", root / "qwen2"


@pytest.fixture(scope="module")
def built(experts, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "base"
    vision, llm = experts
    assert main(["build", "--vision", str(vision), "--llm", str(llm), str(out)]) == 0
    return out


def test_the_built_model_is_the_two_experts_joined(experts, built):
    import llava_manager  # noqa: F401  (registers the Manager model type; the built model has none)

    vision_dir, llm_dir = experts
    model = AutoModelForImageTextToText.from_pretrained(built).eval()
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and not hasattr(model.model, "manager")
    assert model.config.vision_config.num_hidden_layers == 4  # SigLIP's last layer dropped, as LLaVA-OV does
    info = json.loads((built / "compose_info.json").read_text())
    assert info["vision_layers_source"] == 5 and info["added_tokens"] == ["<image>", "<video>"]

    siglip = SiglipVisionModel.from_pretrained(vision_dir).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = siglip(pixels, output_hidden_states=True).hidden_states[:5]  # embeddings + the 4 kept layers
        got = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, want))

    qwen2 = Qwen2ForCausalLM.from_pretrained(llm_dir).eval()
    text_ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        want_logits = qwen2(input_ids=text_ids).logits
        got_logits = model(input_ids=text_ids).logits
    # the LM unchanged on text (up to the matmul's blocking over 2 more vocabulary rows)
    torch.testing.assert_close(got_logits[..., : want_logits.shape[-1]], want_logits, atol=1e-6, rtol=0)

    processor = AutoProcessor.from_pretrained(built)
    tokenizer = processor.tokenizer
    rows = model.get_input_embeddings().weight.shape[0]
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id < rows
    assert tokenizer.convert_tokens_to_ids("<video>") == model.config.video_token_id < rows
    assert rows == len(tokenizer) == qwen2.config.vocab_size + 2  # the two new rows
    assert model.model.image_newline.abs().sum() > 0 and model.model.multi_modal_projector.linear_1.weight.std() > 0
    # the processor counts as many image tokens as the model produces
    inputs = processor(images=[picture(50, 30)], text="<image>\nWhat is it?", return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == features[0].shape[0]


def test_build_refuses_what_it_cannot_use_and_writes_nothing(experts, built, tmp_path, capsys):
    vision, llm = experts
    assert main(["build", "--vision", str(llm), "--llm", str(llm), str(tmp_path / "a")]) == 1
    assert "LLaVA-OV's vision tower is SigLIP" in capsys.readouterr().err
    assert main(["build", "--vision", str(vision), "--llm", str(vision), str(tmp_path / "b")]) == 1
    assert "decoder-only causal LM" in capsys.readouterr().err
    assert main(["build", "--vision", str(vision), "--llm", str(tmp_path / "missing"), str(tmp_path / "c")]) == 1
    assert "--llm" in capsys.readouterr().err
    assert main(["build", "--vision", str(vision), "--llm", str(llm), str(built)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stage1_from_the_built_model_then_chat(built, tmp_path, capsys):
    """stage1 as shipped, shortened: towers frozen, projector + Managers trained; then chat answers."""
    recipe = load_recipe(
        "stage1",
        [
            "--model_name_or_path", str(built), "--data_path", "synthetic:8", "--output_dir", str(tmp_path / "s1"),
            "--max_steps", "5", "--per_device_train_batch_size", "2", "--global_batch_size", "null",
            "--gradient_accumulation_steps", "1", "--bf16", "false", "--gradient_checkpointing", "false",
            "--deepspeed", "null", "--model_max_length", "256", "--save_steps", "0", "--logging_steps", "1",
            "--dataloader_num_workers", "0", "--check_images", "open", "--manager.llm_layers", "[0, 2]",
        ],
    )  # fmt: skip
    assert recipe.train_parts == ["manager", "projector"]
    result = train(recipe)
    assert len(result.losses) == 5
    import llava_manager  # noqa: F401

    before = AutoModelForImageTextToText.from_pretrained(built).eval()
    after = AutoModelForImageTextToText.from_pretrained(result.output_dir).eval()
    assert type(after).__name__ == "LlavaOnevisionManagerForConditionalGeneration"
    old, new = before.state_dict(), after.state_dict()
    for name, tensor in old.items():
        trained = "multi_modal_projector" in name  # image_newline: trained with it, but stage 1's square crops skip it
        assert torch.equal(new[name], tensor) != trained, name  # towers frozen, projector trained
    assert any(new[name].abs().sum() > 0 for name in new if ".manager.managers." in name)  # Managers trained

    image = tmp_path / "shape.png"
    picture(64, 48).save(image)
    capsys.readouterr()
    assert main(["chat", str(result.output_dir), "--image", str(image), "--max-new-tokens", "4", "What is it?"]) == 0
    answer = capsys.readouterr().out
    # the same answer by hand: the saved processor's chat template, greedy generate, decode
    processor = AutoProcessor.from_pretrained(result.output_dir)
    content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[picture(64, 48)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = after.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.rstrip("\n") == expected.rstrip("\n") and tokens.shape[1] > inputs["input_ids"].shape[1]
