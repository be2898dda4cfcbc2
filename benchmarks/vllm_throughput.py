"""Throughput of a Manager checkpoint in vLLM against the same weights served as vLLM's own LLaVA-OV.

Run with the vLLM venv (`make venv-vllm`), from the repository root:

    .venv-vllm/bin/python benchmarks/vllm_throughput.py                       # half-0.5b widths, CPU, fp32
    .venv-vllm/bin/python benchmarks/vllm_throughput.py --requests 4 --max-tokens 16 --rounds 1 --json out.json

It writes one random checkpoint (`overhead.py`'s preset widths, the paper's Managers with random non-zero weights)
and its twin without Managers (`tests/vllm/checkpoints.as_stock_llava_onevision`: vLLM's stock LLaVA-OV), then, for
each round and each model in alternating order, starts an engine, warms it up and times one `generate` call over
the same batch of image requests (fresh images every round: vLLM's encoder cache would otherwise skip the tower;
prefix caching off). Reported: tokens per second (prompt + generated), generated tokens per second, and the
Manager / stock ratio of each round's times (the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vllm"))  # the test checkpoints' helpers


def write_models(folder: Path, preset_name: str) -> tuple[Path, Path]:
    import torch
    from checkpoints import as_stock_llava_onevision, randomise_managers
    from overhead import PRESETS, build_config
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_manager import ManagerConfig, patch_llava
    from llava_manager.testing.tiny import tiny_processor, tiny_vocabulary

    preset = PRESETS[preset_name]
    config = build_config(preset)
    vocabulary = tiny_vocabulary()  # the tiny tokenizer's ids; the LM head keeps the preset's vocabulary size
    config.image_token_id, config.video_token_id = vocabulary.index("<image>"), vocabulary.index("<video>")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model = patch_llava(model, ManagerConfig(vision_layers=preset.vision_layers))
    randomise_managers(model, scale=0.02)
    manager = folder / "manager"
    model.save_pretrained(manager)
    tiny_processor(model.config).save_pretrained(manager)
    return manager, as_stock_llava_onevision(manager, folder / "stock")


def run(model: Path, requests: list[dict], max_tokens: int, warmup: dict) -> dict:
    from engines import engine, greedy

    with engine(
        model, max_model_len=8192, limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False
    ) as llm:
        llm.generate([warmup], greedy(2), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(requests, greedy(max_tokens), use_tqdm=False)
        seconds = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "tokens_per_s": (prompt_tokens + generated) / seconds,
        "generated_per_s": generated / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="half-0.5b", help="a preset of benchmarks/overhead.py")
    parser.add_argument("--requests", type=int, default=6, help="image requests per batch (default 6)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    parser.add_argument("--image", default="384x384", help="WxH of each image (default 384x384: base + 1 crop)")
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per model (default 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from checkpoints import make_image, prompt
    from transformers import AutoProcessor

    width, height = (int(v) for v in args.image.split("x"))
    results = {"manager": [], "stock": []}
    with tempfile.TemporaryDirectory() as scratch:
        manager, stock = write_models(Path(scratch), args.preset)
        processor = AutoProcessor.from_pretrained(manager)
        text = prompt(processor, "what is shown in the picture")
        warmup = {"prompt": text, "multi_modal_data": {"image": make_image(width, height, seed=10_000)}}
        for round_index in range(args.rounds):
            requests = [
                {"prompt": text, "multi_modal_data": {"image": make_image(width, height, seed=100 * round_index + i)}}
                for i in range(args.requests)
            ]
            order = [("manager", manager), ("stock", stock)]
            for label, folder in order if round_index % 2 == 0 else order[::-1]:
                results[label].append(run(folder, requests, args.max_tokens, warmup))
                print(f"round {round_index} {label}: {results[label][-1]}", flush=True)
    ratios = [m["seconds"] / s["seconds"] for m, s in zip(results["manager"], results["stock"])]
    summary = {
        "preset": args.preset,
        "requests": args.requests,
        "image": args.image,
        "max_tokens": args.max_tokens,
        "time_ratio_manager_over_stock": statistics.median(ratios),
        "ratios": ratios,
        **{
            f"{label}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs)
            for label, runs in results.items()
        },
        **{
            f"{label}_generated_per_s": statistics.median(r["generated_per_s"] for r in runs)
            for label, runs in results.items()
        },
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
