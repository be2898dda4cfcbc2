"""generate(): features computed before prefill travel with the image features (beam search, left padding),
the first step equals a plain forward, and decode steps do no Manager work."""

import inspect

import pytest
import torch
from inputs import single_image_batch, two_image_prompts_batch
from test_patch import perturb
from transformers import LlavaOnevisionForConditionalGeneration

from llava_manager import ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_model

CONFIGS = {
    "static": ManagerConfig(llm_layers=[0, 1, 3]),
    "adaptive_average": ManagerConfig(manager_type="adaptive_average", llm_layers=[0, 2], query_token_id=1),
}


def _model(name):
    model = patch_llava(tiny_model(), CONFIGS[name])
    perturb(model)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_first_generated_step_equals_forward(name):
    model, batch = _model(name), two_image_prompts_batch()
    with torch.no_grad():
        forward_last = model(**batch).logits[:, -1]
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(out.logits[0], forward_last, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_with_and_without_cache_gives_the_same_tokens(name):
    model, batch = _model(name), single_image_batch()
    cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_search_and_num_return_sequences():
    model, batch = _model("static"), two_image_prompts_batch()
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 4
    single = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=3)
    assert torch.equal(out[::2], single)  # the best beam of each sample, with or without extra sequences


def test_decode_steps_do_no_manager_work():
    model, batch = _model("static"), single_image_batch()
    calls = []
    for manager in model.model.manager.managers:
        manager.register_forward_hook(lambda *args: calls.append(1))
    model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == len(model.model.manager.managers)  # prefill only, once each


def test_managers_change_the_generated_distribution():
    batch = single_image_batch()
    plain = tiny_model().generate(
        **batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    managed = _model("static").generate(
        **batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert (managed.logits[0] - plain.logits[0]).abs().max() > 1e-3


def test_a_generated_image_token_is_a_plain_token():
    """An <image> id produced by generation has no features: transformers embeds it as text, and so do we."""
    model, batch = _model("static"), single_image_batch()
    image_token = model.config.image_token_id
    with torch.no_grad():
        model.lm_head.weight[image_token] += 100.0  # make the model emit <image>
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert (out[0, batch["input_ids"].shape[1] :] == image_token).all()


def _pre_encoded(model, batch):
    """Chunked prefill needs the image encoded up front (transformers cannot split pixel_values)."""
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    inputs = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_sizes")}
    return inputs, {"image": features}


def _chunked_prefill_logits(model, batch):
    inputs, encoded = _pre_encoded(model, batch)
    assert inputs["input_ids"].shape[1] > 2 * 7  # several chunks, the image split across them
    return model.generate(
        **inputs,
        mm_encoder_outputs=encoded,
        prefill_chunk_size=7,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def _vanilla_chunks_images_exactly() -> bool:
    """Whether this transformers itself prefills images in chunks correctly: not before its LLaVA-OV forward took
    `mm_encoder_outputs`, and on 5.19 the unpatched model's chunked logits are off by about 0.45."""
    if "mm_encoder_outputs" not in inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters:
        return False
    model, batch = tiny_model(), single_image_batch()
    whole = model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    chunked = _chunked_prefill_logits(model, batch)
    return torch.allclose(chunked.logits[0], whole.logits[0], atol=1e-5, rtol=0)


def test_chunked_prefill_with_static_managers_matches_one_prefill():
    if not _vanilla_chunks_images_exactly():
        pytest.skip("this transformers cannot prefill images in chunks, even without Managers")
    model, batch = _model("static"), single_image_batch()
    whole = model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    chunked = _chunked_prefill_logits(model, batch)
    assert torch.equal(chunked.sequences, whole.sequences)
    torch.testing.assert_close(chunked.logits[0], whole.logits[0], atol=1e-5, rtol=0)


def test_adaptive_managers_refuse_chunked_prefill():
    from llava_manager import ManagerError

    model, batch = _model("adaptive_average"), single_image_batch()
    inputs, encoded = _pre_encoded(model, batch)
    with pytest.raises(ManagerError, match="prefill_chunk_size=7"):
        model.generate(**inputs, mm_encoder_outputs=encoded, prefill_chunk_size=7, max_new_tokens=2)


# transformers 5.24 renamed the forward's past_key_values= to cache= (the old name still works, deprecated)
_FORWARD_PARAMETERS = inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters
CACHE_ARGUMENTS = ["past_key_values"] + (["cache"] if "cache" in _FORWARD_PARAMETERS else [])


@pytest.mark.parametrize("cache_argument", CACHE_ARGUMENTS)
def test_adaptive_managers_refuse_image_tokens_after_a_filled_cache(cache_argument):
    from llava_manager import ManagerError

    model, batch = _model("adaptive_average"), single_image_batch()
    first_image = int((batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    with torch.no_grad():
        head = model(input_ids=batch["input_ids"][:, :first_image], use_cache=True)
        with pytest.raises(ManagerError, match="filled KV cache"):
            model(
                input_ids=batch["input_ids"][:, first_image:],
                pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"],
                attention_mask=batch["attention_mask"],
                use_cache=True,
                **{cache_argument: head.cache if "cache" in _FORWARD_PARAMETERS else head.past_key_values},
            )
