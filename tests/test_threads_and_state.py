"""Per-forward state: threads sharing one patched model each get their own answer, nothing of a batch stays
referenced after its forward, and our code triggers no transformers deprecation warning."""

import gc
import logging
import threading
import warnings
import weakref

import pytest
import torch
from inputs import multi_image_batch, picture, prompt, single_image_batch, text_only_batch
from test_patch import perturb

from llava_manager import ManagerConfig, patch_llava
from llava_manager.testing.tiny import tiny_model, tiny_processor

CONFIGS = {
    "static": ManagerConfig(llm_layers=[0, 1, 3]),
    "adaptive_cross": ManagerConfig(manager_type="adaptive_cross", llm_layers=[0, 2], query_token_id=1),
    "projector": ManagerConfig(injection="projector"),
}


def _requests():
    processor = tiny_processor()
    other = processor(
        images=[picture(70, 90, "green", 1)], text=prompt(processor, "Where is it?", 1), return_tensors="pt"
    )
    return [single_image_batch(processor), other, multi_image_batch(processor), text_only_batch(processor)]


def _generate(model, batch):
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_threads_generating_on_one_model_each_get_their_own_answer(config_name):
    model = patch_llava(tiny_model(), CONFIGS[config_name])
    perturb(model)
    requests = _requests()
    expected = [_generate(model, batch) for batch in requests]
    rounds, failures, results = 3, [], {}
    start = threading.Barrier(len(requests))

    def worker(index):
        try:
            start.wait()
            for round_index in range(rounds):
                results[index, round_index] = _generate(model, requests[index])
        except BaseException as error:  # reported below, with the thread it happened in
            failures.append((index, repr(error)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    assert len(results) == rounds * len(requests)
    for (index, _), (sequences, scores) in results.items():
        assert torch.equal(sequences, expected[index][0]), index
        torch.testing.assert_close(scores, expected[index][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["layout only", "llm", "projector"])
def test_no_reference_to_a_batch_after_its_forward(mode):
    """The tower's output (every crop's last hidden state) and the image features are freed once the forward has
    returned and its output is dropped: nothing per batch stays on the model."""
    model = tiny_model()
    if mode == "layout only":
        patch_llava(model, managers=False)
    else:
        patch_llava(model, ManagerConfig(injection=mode))
    alive = []
    model.model.vision_tower.register_forward_hook(lambda m, a, out: alive.append(weakref.ref(out.last_hidden_state)))
    batch = single_image_batch()
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.isfinite().all() and len(alive) == 1
    del output
    gc.collect()
    assert alive[0]() is None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_deprecation_warning_from_our_code(tmp_path):
    """Patch, forward with a cache, generate, train a step, save and load: no transformers deprecation message and no
    Python deprecation warning raised from llava_manager."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    records = _Records()
    hf_logging.get_logger("transformers").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = patch_llava(tiny_model(), CONFIGS["static"])
            batch = single_image_batch()
            with torch.no_grad():
                model(**batch, use_cache=True)
            model.generate(**batch, max_new_tokens=3, do_sample=False)
            model.train()
            model(**batch).logits.sum().backward()
            model.save_pretrained(tmp_path)
            AutoModelForImageTextToText.from_pretrained(tmp_path)
    finally:
        hf_logging.get_logger("transformers").removeHandler(records)
    deprecated = [m for m in records.messages if "deprecat" in m.lower()]
    ours = [
        str(w.message)
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "llava_manager" in (w.filename or "")
    ]
    assert not deprecated and not ours, (deprecated, ours)
