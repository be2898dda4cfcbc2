"""Every static Manager family, injection site, `grid` span and image layout a checkpoint can carry, served by vLLM
like transformers serves it (one engine per checkpoint; an AnyRes image, two images and a video each)."""

from __future__ import annotations

import pytest
from checkpoints import make_image, make_video, prompt, write_checkpoint
from engines import engine, greedy
from reference import Request, assert_same_answer, transformers_answers, vllm_answer

import llava_manager
from llava_manager import ImageLayout, ManagerConfig

VARIANTS = {
    # BridgeTower-style one-to-one Managers on the grid crops only; the original's truncating unpad arithmetic
    "bridge-grid-truncate": (
        ManagerConfig(manager_type="bridge", llm_layers=[0, 2], grid="grid"),
        {"layout": ImageLayout(unpad="truncate")},
    ),
    # ManagerTower's normalised Managers (not linear: packing must come before them) on the base crop only, no
    # Manager at layer 0 (two buffer slots), no layer embedding, and the anyres_max shrink (bilinear) on every grid
    "tower-base-shrink": (
        ManagerConfig(manager_type="tower", llm_layers=[1, 3], grid="base", layer_embedding=False),
        {"aspect_ratio": "anyres_max_1"},
    ),
    # one vision-space Manager before the projector (no LLM-side additions)
    "projector": (ManagerConfig(injection="projector"), {}),
    # one square crop per image, no newline (the paper's no-grid checkpoints)
    "square-layout": (ManagerConfig(llm_layers=[0, 2]), {"layout": ImageLayout(mode="square")}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_checkpoint_variant(tmp_path, name):
    manager, options = VARIANTS[name]
    folder = write_checkpoint(tmp_path / name, manager, **options)
    model, processor = llava_manager.from_pretrained(folder)
    requests = [
        Request(prompt(processor, "what is the shape"), [make_image(80, 48)]),
        Request(prompt(processor, "which is the", images=2), [make_image(80, 48), make_image(30, 90, seed=2)]),
        Request(prompt(processor, "does the shape move", images=0, videos=1), [], make_video()),
    ]
    expected = transformers_answers(model, processor, requests, max_tokens=6)
    with engine(folder) as llm:
        outputs = llm.generate([r.for_vllm() for r in requests], greedy(6))
    for label, output, answer in zip(("anyres", "two images", "video"), outputs, expected):
        assert_same_answer(vllm_answer(output), answer, what=f"{name}, {label}")
