"""vLLM's answers on Manager checkpoints equal transformers' `generate` (greedy tokens and top-5 log-probabilities),
for single images of every shape, batches, chunked prefill, prefix caching and a compiled model; zeroed Managers
equal vLLM's own LLaVA-OV."""

from __future__ import annotations

import pytest
from checkpoints import as_stock_llava_onevision, make_image, make_video, prompt, write_checkpoint
from engines import engine, greedy
from reference import Request, assert_same_answer, largest_difference, transformers_answers, vllm_answer

import llava_manager

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("manager"))


@pytest.fixture(scope="module")
def hf(checkpoint):
    return llava_manager.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def requests(hf):
    _, processor = hf
    return {
        "anyres": Request(prompt(processor, "what is the shape"), [make_image(80, 48)]),  # 2x1 grid, unpadded
        "square": Request(prompt(processor, "how many are there"), [make_image(64, 64, seed=1)]),
        "tall": Request(prompt(processor, "where is the"), [make_image(30, 90, seed=2)]),  # 1x3 grid
        "text": Request(prompt(processor, "what is the shape", images=0), []),
        "video": Request(prompt(processor, "does the shape move", images=0, videos=1), [], make_video()),
        # the anyres image again, beside another: transformers gives each its base crop and one newline
        "two": Request(prompt(processor, "which is the", images=2), [make_image(80, 48), make_image(30, 90, seed=2)]),
    }


@pytest.fixture(scope="module")
def expected(hf, requests):
    model, processor = hf
    names = list(requests)
    answers = transformers_answers(model, processor, [requests[n] for n in names], MAX_TOKENS)
    return dict(zip(names, answers))


def _image_span(prompt_ids: list[int], image_token_id: int) -> tuple[int, int]:
    positions = [i for i, token in enumerate(prompt_ids) if token == image_token_id]
    return positions[0], positions[-1] + 1


def test_a_batch_of_different_requests_and_a_prefix_cache_hit(checkpoint, hf, requests, expected):
    names = ["anyres", "square", "tall", "text", "two", "video"]
    with engine(checkpoint, enable_prefix_caching=True, block_size=32) as llm:  # blocks smaller than a prompt
        outputs = llm.generate([requests[n].for_vllm() for n in names], greedy(MAX_TOKENS))
        for name, output in zip(names, outputs):
            assert_same_answer(vllm_answer(output), expected[name], what=name)
        # the same image prompt again: its prefix (image tokens included) comes from the KV cache
        again = llm.generate([requests["anyres"].for_vllm()], greedy(MAX_TOKENS))[0]
        # several images with a video: refused with the way out (vLLM would give each image its own grid)
        mixed = Request(prompt(hf[1], "which is the", images=2, videos=1), requests["two"].images, make_video())
        with pytest.raises(Exception, match="several images and a video"):
            llm.generate([mixed.for_vllm()], greedy(MAX_TOKENS))
        # the engine still serves afterwards
        assert_same_answer(
            vllm_answer(llm.generate([requests["text"].for_vllm()], greedy(MAX_TOKENS))[0]), expected["text"]
        )
    assert again.num_cached_tokens > 0
    assert_same_answer(vllm_answer(again), expected["anyres"], what="anyres from the prefix cache")


def test_chunked_prefill_with_a_chunk_boundary_inside_the_image(checkpoint, hf, requests, expected):
    chunk = 32
    with engine(
        checkpoint, enable_chunked_prefill=True, max_num_batched_tokens=chunk, enable_prefix_caching=False
    ) as llm:
        output = llm.generate([requests["anyres"].for_vllm()], greedy(MAX_TOKENS))[0]
    start, stop = _image_span(output.prompt_token_ids, hf[0].config.image_token_id)
    assert start // chunk != (stop - 1) // chunk  # the image tokens are split across prefill chunks
    assert_same_answer(vllm_answer(output), expected["anyres"], what="chunked")


def test_a_compiled_model(checkpoint, requests, expected):
    """torch.compile on, as vLLM serves by default (on CPU: Dynamo traces the model once, at start-up, on the
    profiling inputs, and inductor compiles it): the Managers' additions are read from their buffers at run time,
    not baked in as the zeros the trace saw."""
    names = ["anyres", "text", "tall"]
    with engine(checkpoint, enforce_eager=False) as llm:
        outputs = llm.generate([requests[n].for_vllm() for n in names], greedy(MAX_TOKENS))
    for name, output in zip(names, outputs):
        assert_same_answer(vllm_answer(output), expected[name], what=f"compiled {name}")


def test_zeroed_managers_equal_vllms_llava_onevision(tmp_path, requests, expected):
    zero = write_checkpoint(tmp_path / "zero", zero=True)
    stock = as_stock_llava_onevision(zero, tmp_path / "stock")
    names = ["anyres", "square", "text"]
    answers = {}
    for label, folder in (("manager", zero), ("stock", stock)):
        with engine(folder) as llm:
            outputs = llm.generate([requests[n].for_vllm() for n in names], greedy(MAX_TOKENS))
        answers[label] = [vllm_answer(o) for o in outputs]
    for name, mine, stock_answer in zip(names, answers["manager"], answers["stock"]):
        assert_same_answer(mine, stock_answer, atol=1e-5, what=f"zero Managers vs stock, {name}")
    # and the random Managers of the other tests change the answer (so their comparisons are not trivial)
    assert largest_difference(answers["manager"][0], expected["anyres"]) > 1e-2 or (
        answers["manager"][0].tokens != expected["anyres"].tokens
    )


def test_adaptive_managers_are_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its error reaches us
    from llava_manager.testing.tiny import tiny_vocabulary

    adaptive = llava_manager.ManagerConfig(
        manager_type="adaptive", query_token_id=tiny_vocabulary().index("<|im_start|>")
    )
    folder = write_checkpoint(tmp_path / "adaptive", adaptive)
    with pytest.raises(Exception, match="adaptive Managers .* transformers' generate"), engine(folder):
        pass
