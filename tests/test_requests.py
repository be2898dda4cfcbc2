"""Generation requests the model cannot answer as asked get a clear `RequestError` (never an empty answer), and an
answer that would run past the context is cut to fit, with a warning (`ask`, `ask_batch`, the lmms-eval model)."""

import logging
import math

import pytest
from inputs import picture

from llava_manager.chat import ask, ask_batch, build_prompt, check_request, context_limit
from llava_manager.errors import ManagerError, RequestError
from llava_manager.testing.tiny import tiny_model, tiny_processor


@pytest.fixture(scope="module")
def model_and_processor():
    model = tiny_model()
    return model, tiny_processor(model.config)


def _prompt_tokens(processor, images, question) -> int:
    prompt = build_prompt(processor, len(images), question)
    return processor(images=images or None, text=prompt, return_tensors="pt")["input_ids"].shape[1]


@pytest.mark.parametrize(
    "question, options, words",
    [
        ("", {}, "question is empty"),
        (" \n\t", {}, "question is empty"),
        ("q", {"temperature": math.nan}, "temperature nan"),
        ("q", {"temperature": math.inf}, "temperature inf"),
        ("q", {"temperature": -0.5}, "temperature -0.5"),
        ("q", {"temperature": "0.7"}, "temperature '0.7'"),
        ("q", {"max_new_tokens": 0}, "max_new_tokens 0"),
    ],
)
def test_a_request_that_cannot_be_answered_as_asked_is_refused(model_and_processor, question, options, words):
    model, processor = model_and_processor
    with pytest.raises(RequestError, match=words) as caught:
        ask(model, processor, [picture(40, 30)], question, **options)
    assert isinstance(caught.value, ManagerError)


def test_a_prompt_as_long_as_the_context_is_an_error_naming_both_lengths(model_and_processor):
    model, processor = model_and_processor
    question = "t30 " * 5000
    length = _prompt_tokens(processor, [picture(40, 30)], question)
    limit = context_limit(model)
    assert limit == 4096 and length > limit
    with pytest.raises(RequestError, match=rf"is {length} tokens \(images included\), the model's context is {limit}"):
        ask(model, processor, [picture(40, 30)], question)
    with pytest.raises(RequestError, match=r"longest prompt of items 0\.\.1"):
        ask_batch(model, processor, [([], "q"), ([], question)])


def test_an_answer_that_would_run_past_the_context_is_cut_to_fit_with_a_warning(
    model_and_processor, monkeypatch, caplog
):
    model, processor = model_and_processor
    images, question = [picture(40, 30)], "What color is it?"
    length = _prompt_tokens(processor, images, question)
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", length + 3)
    seen = {}
    generate = model.generate

    def recording_generate(**kwargs):
        seen["max_new_tokens"] = kwargs["max_new_tokens"]
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    with caplog.at_level(logging.WARNING, logger="llava_manager.chat"):
        ask(model, processor, images, question, max_new_tokens=50)
    assert seen["max_new_tokens"] == 3
    assert f"is {length} tokens of the model's {length + 3}" in caplog.text and "instead of 50" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_manager.chat"):
        ask(model, processor, images, question, max_new_tokens=2)  # fits: no cut, no warning
    assert seen["max_new_tokens"] == 2 and not caplog.text


def test_check_request_accepts_what_ask_answers():
    check_request("What is it?", temperature=0, max_new_tokens=1)
    check_request("What is it?", temperature=0.7, max_new_tokens=64)
