"""transformers' greedy answers (the reference) and the comparison with vLLM's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP = 5


@dataclass
class Request:
    """One prompt: chat text with `<image>` placeholders and its images (PIL)."""

    prompt: str
    images: list
    video: object = None  # (frames, H, W, 3) uint8

    def for_vllm(self) -> dict:
        media = {}
        if self.images:
            media["image"] = self.images if len(self.images) > 1 else self.images[0]
        if self.video is not None:
            media["video"] = self.video
        return {"prompt": self.prompt, "multi_modal_data": media} if media else {"prompt": self.prompt}


@dataclass
class Answer:
    tokens: list[int]
    top: list[dict[int, float]]  # per step: the TOP most likely tokens and their log-probabilities
    prompt_length: int


def transformers_answers(model, processor, requests: list[Request], max_tokens: int) -> list[Answer]:
    """Greedy `generate` one request at a time (no padding), fp32."""
    answers = []
    for request in requests:
        # nested: the request's images belong to one sample (a flat list would make each image a sample of its own,
        # and transformers then gives every image its whole AnyRes grid instead of LLaVA-OV's multi-image layout)
        images = [request.images] if request.images else None
        videos = [request.video] if request.video is not None else None
        inputs = processor(images=images, videos=videos, text=request.prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        length = inputs["input_ids"].shape[1]
        tops = []
        for scores in out.scores:
            logprobs = torch.log_softmax(scores[0].float(), -1)
            values, ids = logprobs.topk(TOP)
            tops.append(dict(zip(ids.tolist(), values.tolist())))
        answers.append(Answer(out.sequences[0, length:].tolist(), tops, length))
    return answers


def vllm_answer(output) -> Answer:
    completion = output.outputs[0]
    tops = [{token: entry.logprob for token, entry in step.items()} for step in completion.logprobs]
    return Answer(list(completion.token_ids), tops, len(output.prompt_token_ids))


def assert_same_answer(got: Answer, expected: Answer, atol: float = 2e-4, what: str = "") -> None:
    """Same prompt length and greedy tokens; at every step vLLM's top tokens are transformers' and their
    log-probabilities agree to `atol` (fp32; vLLM's kernels differ from transformers' in the last bits)."""
    assert got.prompt_length == expected.prompt_length, f"{what}: prompt lengths differ"
    assert got.tokens == expected.tokens, f"{what}: tokens {got.tokens} != transformers' {expected.tokens}"
    for step, (mine, theirs) in enumerate(zip(got.top, expected.top)):
        for token, value in theirs.items():
            if token in mine:
                assert abs(mine[token] - value) <= atol, f"{what}: step {step} token {token}: {mine[token]} vs {value}"
        top_mine = sorted(mine, key=mine.get, reverse=True)[:TOP]
        top_theirs = sorted(theirs, key=theirs.get, reverse=True)[:TOP]
        # the same top tokens, up to near-ties at the boundary of the top-k
        missing = [t for t in top_theirs if t not in mine and theirs[t] - min(theirs.values()) > atol]
        assert not missing, f"{what}: step {step}: transformers' top tokens {missing} not in vLLM's {top_mine}"


def largest_difference(a: Answer, b: Answer) -> float:
    """The largest log-probability difference over the tokens both answers rank at the first step."""
    shared = set(a.top[0]) & set(b.top[0])
    return max((abs(a.top[0][t] - b.top[0][t]) for t in shared), default=float("inf"))
