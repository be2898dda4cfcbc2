"""The authors' own implementation on tiny random models (tests/fixtures/oracle) is the reference:
every case's logits over the whole expanded sequence, through `load_original`."""

import pytest
import torch

import llava_manager
from llava_manager.injection import instruction_positions
from oracle_cases import CASES, IM_START, hf_inputs, load_case, max_logit_diff


def _logits(case, attn_implementation):
    settings = case.meta["settings"]
    adaptive = settings["mm_manager_type"].startswith("adaptive")
    kwargs = {"im_start_token_id": IM_START} if adaptive else {}  # static: no argument needed
    model = llava_manager.load_original(case.checkpoint, attn_implementation=attn_implementation, **kwargs)
    inputs = hf_inputs(case, model.config.image_token_id)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", CASES)
def test_oracle_logits_exact_with_eager_attention(name):
    case = load_case(name)
    assert max_logit_diff(case, _logits(case, "eager")) == 0.0


@pytest.mark.parametrize("name", ["static_all_anyres", "adaptive_cross_zerouni", "batch2_static_all", "static_square"])
def test_oracle_logits_with_sdpa(name):
    case = load_case(name)
    assert max_logit_diff(case, _logits(case, "sdpa")) <= 1e-4


@pytest.mark.parametrize("name", [c for c in CASES if c.startswith("adaptive")])
def test_instruction_span_matches_the_original(name):
    case = load_case(name)
    inputs = hf_inputs(case, image_token_id=127)
    ids = inputs["input_ids"][0].tolist()
    span = instruction_positions([i == 127 for i in ids], [i == IM_START for i in ids], inputs["attention_mask"][0].bool().tolist())
    assert span == case.meta["samples"][0]["query_positions"]


def test_unpad_float_edge_keeps_the_original_token_count():
    case = load_case("unpad_float_edge")
    model = llava_manager.load_original(case.checkpoint)
    inputs = hf_inputs(case, model.config.image_token_id)
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    assert features.pooler_output[0].shape[0] == case.meta["samples"][0]["visual_length_main"] == 1701
