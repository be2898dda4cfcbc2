"""What Managers cost: a patched LLaVA-OV against the same model unpatched, measured in one process.

Both models share every weight tensor (one copy in memory). Runs are interleaved (vanilla and patched
alternate, and the order flips every repetition) and each figure is the median of `--repeats`
repetitions after `--warmup` unmeasured ones. On CPU the prefill and train steps go further
(`--interleave layer`, benchmarks/lockstep.py): the two models run their step in lockstep, handing over
at every layer, and each side's time is the sum of its own slices. A shared VM's speed drifts by
10-30% within seconds, so whole 18-second steps timed one after the other differ by up to 10% with
identical work; slices a few hundred milliseconds apart see the same machine. Measured per image mode:

- prefill: one forward over prompt + image with a KV cache, keeping only the last logits (as `generate()`);
- decode step: one token with the filled KV cache (median of `--decode-steps` steps per repetition, the two
  models taking turns step by step);
- train step: forward with labels + backward, in training mode (Manager jitter on), with activation checkpointing
  of every layer as the recipes train (`--no-gradient-checkpointing`: without; on CPU the two train steps then run
  whole, one after the other, since in lockstep both steps' activations would be alive at once); logits and loss
  only on the text after the image (the answer) unless `--full-logits` (a smaller denominator, so a stricter ratio);
- peak memory of each: weights plus the step's peak of live tensor bytes above what was live before it
  (CUDA: `max_memory_allocated`; CPU: the profiler's allocation events), measured once after the timings;
- FLOPs of prefill and train step (`torch.utils.flop_counter`): the floor for the time ratio.

On CPU with glibc the script restarts itself once with malloc tunables (`STEADY_MALLOC`: no mmap for large
blocks up to 1 GiB, no trimming) unless `--system-malloc`. With glibc's defaults every large tensor
is a fresh mmap and is page-faulted in on first touch, every step: on the 2-core VM that made a 73 MB
elementwise op 5x slower and was the largest source of run-to-run noise, on both sides.

Models are built from config with random weights (nothing is downloaded). Presets: `tiny` (seconds; what
the test runs), `half-0.5b` (the real 0.5B widths with half the depth: minutes on 2 CPU cores) and
`paper-0.5b` (the full LLaVA-OV-0.5B shapes and the paper's Managers; for a GPU).

    python benchmarks/overhead.py --preset half-0.5b                      # CPU, fp32, square + anyres 2x2
    python benchmarks/overhead.py --preset half-0.5b --images video8      # one video of 8 frames (video = 8 and 32)
    python benchmarks/overhead.py --preset paper-0.5b --device cuda --dtype bfloat16 --images square,anyres,anyres_max_9
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from lockstep import run_lockstep

from llava_manager import ImageLayout, ManagerConfig, patch_llava
from llava_manager.config import default_vision_layers

IMAGE_MODES = ("square", "anyres", "anyres_max_9")
VIDEO_MODES = ("video8", "video32")  # one video of N frames (any `videoN` works); `--images video` = both
PHASES = ("prefill", "decode", "train")
# glibc malloc: blocks up to 1 GiB from the heap (no mmap per tensor), never trimmed; larger ones still mmap'ed
# (with no mmap at all, multi-GB blocks such as --full-logits' logits fragment the heap until memory runs out).
# One arena: the lockstep threads would otherwise get their own arenas, whose heaps (64 MiB at most) mmap every
# large tensor afresh whatever the threshold (18 s -> 21 s per half-0.5b anyres prefill, and noisier).
STEADY_MALLOC = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=68719476736"
)


# ---- models ---------------------------------------------------------------------------------------------
@dataclass
class Preset:
    vision: dict  # SiglipVisionConfig kwargs
    text: dict  # Qwen2Config kwargs
    image_token_id: int
    vision_layers: list[int] | None  # None: the package default (top half)
    images: tuple[str, ...]  # image modes run when --images is not given
    text_tokens: tuple[int, int] = (24, 40)  # prompt tokens before / after the image
    extra: dict = field(default_factory=dict)


def _siglip(hidden, intermediate, heads, layers, image, patch):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=image,
        patch_size=patch,
        vision_use_head=False,
    )


def _qwen2(hidden, intermediate, heads, kv_heads, layers, vocab):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    )


PRESETS = {
    # llava_manager.testing.tiny's widths; pinpoints up to 6x6 crops so that every image mode exists
    "tiny": Preset(
        vision=_siglip(32, 64, 4, 4, 32, 8),
        text=_qwen2(64, 128, 4, 2, 4, 256),
        image_token_id=254,
        vision_layers=None,
        images=IMAGE_MODES,
        text_tokens=(8, 12),
    ),
    # LLaVA-OV-0.5B widths (SigLIP so400m, Qwen2-0.5B), half the depth: 6 of 13 SigLIP entries, LLM layers 0, 4, 8
    "half-0.5b": Preset(
        vision=_siglip(1152, 4304, 16, 13, 384, 14),
        text=_qwen2(896, 4864, 14, 2, 12, 151936),
        image_token_id=151646,
        vision_layers=list(range(7, 13)),
        images=("square", "anyres"),
    ),
    # LLaVA-OV-0.5B as released (26 SigLIP layers, 24 Qwen2 layers) with the paper's Managers: 13..25, 0, 4, ..., 20
    "paper-0.5b": Preset(
        vision=_siglip(1152, 4304, 16, 26, 384, 14),
        text=_qwen2(896, 4864, 14, 2, 24, 151936),
        image_token_id=151646,
        vision_layers=None,
        images=IMAGE_MODES,
    ),
}


def build_config(preset: Preset):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    crop = preset.vision["image_size"]
    pinpoints = [[crop * rows, crop * cols] for rows in range(1, 7) for cols in range(1, 7)]  # LLaVA-OV's 1x1..6x6
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**preset.vision),
        text_config=Qwen2Config(**preset.text),
        image_token_index=preset.image_token_id,
        video_token_index=preset.image_token_id + 1,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every layer, non-reentrant, as llava_manager.train sets it up."""
    enable = (
        getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    )  # 5.24 renamed it
    enable({"use_reentrant": False})


def build_pair(
    preset: Preset,
    *,
    image_mode: str,
    injection: str,
    dtype,
    device,
    attn: str,
    seed: int,
    checkpointing: bool = False,
    manager_type: str = "static",
):
    """(vanilla, patched): two models sharing every weight tensor; Managers with random (non-zero) weights."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = build_config(preset)
    config._attn_implementation = attn
    generator = torch.Generator().manual_seed(seed)
    with no_init_weights():
        vanilla = LlavaOnevisionForConditionalGeneration(config)
        patched = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():  # N(0, 0.02) everywhere, norms at 1: what matters here is shapes, not values
        for name, param in vanilla.named_parameters():
            if param.dim() == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    vanilla.tie_weights()
    vanilla.to(device=device, dtype=dtype)
    patched.load_state_dict(vanilla.state_dict(), assign=True)  # same storage, separate Parameter objects
    patched.tie_weights()
    patched.to(device=device, dtype=dtype)

    square = image_mode == "square"
    layout = ImageLayout(mode="square") if square else ImageLayout()  # (video frames never get crops)
    if square:  # transformers has no square mode: the baseline is the same layout without Managers
        patch_llava(vanilla, layout=layout, managers=False)
    vision_layers = preset.vision_layers or default_vision_layers(patched.config.vision_config.num_hidden_layers)
    if manager_type == "bridge":  # one layer per Manager, as the bridge ablation selects only the layers it reads
        managers = len(range(0, patched.config.text_config.num_hidden_layers, 4)) if injection == "llm" else 1
        vision_layers = vision_layers[-managers:]
    config = ManagerConfig(manager_type=manager_type, vision_layers=vision_layers, injection=injection)
    patch_llava(patched, config, layout=layout)
    with torch.no_grad():  # trained-looking Managers (zero-initialised ones would compute the same, but be honest)
        for param in patched.model.manager.parameters():
            param.copy_(torch.randn(param.shape, generator=generator).mul_(0.02).to(param))
    if checkpointing:  # only acts in training mode: prefill and decode are unchanged
        enable_checkpointing(vanilla)
        enable_checkpointing(patched)
    return vanilla.eval(), patched.eval()


# ---- inputs ---------------------------------------------------------------------------------------------
def video_frames(mode: str) -> int:
    """Frames of a `videoN` mode; 0 for an image mode."""
    return int(mode[len("video") :]) if mode.startswith("video") else 0


def image_size_of(mode: str, crop: int) -> tuple[int, int]:
    """(height, width): square -> one crop; anyres -> a 2x2 grid; anyres_max_9 -> the largest grid (6x6, shrunk);
    a video frame -> one crop."""
    if video_frames(mode):
        return crop, crop
    return {"square": (crop, crop), "anyres": (2 * crop, 2 * crop), "anyres_max_9": (6 * crop, 6 * crop)}[mode]


def _token_sequence(config, preset: Preset, token_id: int, tokens: int, generator) -> torch.Tensor:
    """(1, T): random text, `tokens` media tokens, random text (`preset.text_tokens` around them)."""
    before, after = preset.text_tokens
    text = torch.randint(
        0, min(config.text_config.vocab_size, config.image_token_id), (before + after,), generator=generator
    )
    return torch.cat([text[:before], torch.full((tokens,), token_id), text[before:]])[None]


def build_video_inputs(model, preset: Preset, frames: int, device, dtype, seed: int, full_logits: bool) -> dict:
    """One video of `frames` random frames in the prompt (its token count as the model computes it)."""
    from llava_manager.video import newline_in_video_features

    config = model.config
    crop = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixel_values_videos = torch.randn(1, frames, 3, crop, crop, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos).pooler_output
    tokens = features.shape[1] + (0 if newline_in_video_features(model.model) else 1)  # F * 196 + 1 at 384 px
    input_ids = _token_sequence(config, preset, config.video_token_id, tokens, generator)
    labels = input_ids.masked_fill(input_ids == config.video_token_id, -100)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values_videos": pixel_values_videos,
        "labels": labels.to(device),
        "train_logits": 0 if full_logits else preset.text_tokens[1],
        "crops": frames,
        "image_tokens": tokens,
    }


def build_inputs(model, preset: Preset, image_mode: str, device, dtype, seed: int, full_logits: bool = False) -> dict:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if video_frames(image_mode):
        return build_video_inputs(model, preset, video_frames(image_mode), device, dtype, seed, full_logits)
    config = model.config
    crop = config.vision_config.image_size
    height, width = image_size_of(image_mode, crop)
    sizes = torch.tensor([[height, width]])
    crops = (
        1 if image_mode == "square" else image_size_to_num_patches([height, width], config.image_grid_pinpoints, crop)
    )
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(1, crops, 3, crop, crop, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values, sizes).pooler_output[0].shape[0]
    after = preset.text_tokens[1]
    input_ids = _token_sequence(config, preset, config.image_token_id, tokens, generator)
    labels = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values,
        "image_sizes": sizes.to(device),
        "labels": labels.to(device),
        "train_logits": 0 if full_logits else after,  # the loss on the text after the image (the answer)
        "crops": crops,
        "image_tokens": tokens,
    }


# ---- one step of each kind -----------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_inputs(inputs: dict) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos")
    return {k: inputs[k] for k in keys if k in inputs}


def prefill(model, inputs):
    with torch.inference_mode():
        return model(**_model_inputs(inputs), use_cache=True, logits_to_keep=1)


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """transformers 5.24 renamed the forward's `past_key_values=` to `cache=` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_of(output):
    """The KV cache of a forward's output: `.cache` (transformers >= 5.24; reading `.past_key_values` warns) or
    `.past_key_values` (before)."""
    return output.cache if "cache" in getattr(output, "__dataclass_fields__", {}) else output.past_key_values


def decode_step(model, inputs, cache, step: int):
    token = inputs["input_ids"][:, -1:]
    mask = torch.ones(1, inputs["input_ids"].shape[1] + step + 1, dtype=torch.long, device=token.device)
    with torch.inference_mode():
        return model(input_ids=token, attention_mask=mask, use_cache=True, **{_cache_keyword(type(model)): cache})


def train_step(model, inputs):
    model.train()
    try:
        keep = inputs["train_logits"]  # 0: logits (and loss) at every position, as HF does by default
        labels = inputs["labels"] if keep == 0 else inputs["labels"][:, -keep:]
        loss = model(**_model_inputs(inputs), labels=labels, logits_to_keep=keep, use_cache=False).loss
        loss.backward()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ---- memory and FLOPs ---------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on file descriptor 2; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`), outside the timed steps.

    STEADY_MALLOC never trims, so a long run's heap only grows; fragmentation from the many step shapes would
    otherwise carry into the next image mode (24 GB and the OOM killer, once)."""
    gc.collect()
    if platform.libc_ver()[0] == "glibc":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_bytes(fn, device) -> int:
    """Peak of live tensor bytes while `fn` runs, above what was live when it started."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ---- the run ------------------------------------------------------------------------------------------
def run_image_mode(args, preset: Preset, image_mode: str, device, dtype) -> dict:
    vanilla, patched = build_pair(
        preset,
        image_mode=image_mode,
        injection=args.injection,
        manager_type=args.manager_type,
        dtype=dtype,
        device=device,
        attn=args.attn,
        seed=args.seed,
        checkpointing=args.gradient_checkpointing,
    )
    inputs = build_inputs(vanilla, preset, image_mode, device, dtype, args.seed, full_logits=args.full_logits)
    models = {"vanilla": vanilla, "patched": patched}
    times: dict[str, dict[str, list[float]]] = {phase: {"vanilla": [], "patched": []} for phase in PHASES}
    phases = [p for p in PHASES if p in args.phases]

    total = args.warmup + max(args.repeats, args.train_repeats if "train" in phases else 0)
    for rep in range(total):
        order = ["vanilla", "patched"] if rep % 2 == 0 else ["patched", "vanilla"]
        measured = rep >= args.warmup
        caches = {}
        for phase in phases:
            if rep >= args.warmup + (args.train_repeats if phase == "train" else args.repeats):
                continue  # this phase has all its repetitions
            if phase in args.lockstep_phases:
                run_step = prefill if phase == "prefill" else train_step
                seconds, _ = run_lockstep(
                    [lambda model=models[name]: run_step(model, inputs) for name in order],
                    [models[name] for name in order],
                    threads=args.threads,
                )
                if measured:
                    for name, value in zip(order, seconds):
                        times[phase][name].append(value)
                continue
            if phase == "decode":
                for name in order:
                    if name not in caches:  # the prefill phase may have left one
                        caches[name] = _cache_of(prefill(models[name], inputs))
                steps: dict[str, list[float]] = {name: [] for name in order}
                for step in range(args.decode_steps):  # one step each, alternating: both see the same moment
                    for name in order if step % 2 == 0 else order[::-1]:
                        steps[name].append(
                            timed(lambda: decode_step(models[name], inputs, caches[name], step), device)
                        )
                for name in order:
                    caches.pop(name)
                    if measured:
                        times["decode"][name].append(statistics.median(steps[name]))
                continue
            for name in order:
                model = models[name]
                if phase == "prefill":
                    seconds = timed(lambda: caches.__setitem__(name, _cache_of(prefill(model, inputs))), device)
                    if measured:
                        times["prefill"][name].append(seconds)
                if phase == "train":
                    seconds = timed(lambda: train_step(model, inputs), device)
                    if measured:
                        times["train"][name].append(seconds)
        caches.clear()
        if args.verbose:
            ran = [p for p in phases if rep < args.warmup + (args.train_repeats if p == "train" else args.repeats)]
            last = {p: {n: round(v[-1], 4) for n, v in times[p].items() if v and measured} for p in ran}
            print(f"  [{image_mode}] rep {rep + 1}/{total}{'' if measured else ' (warm-up)'}: {last}", file=sys.stderr)

    result = {
        "image_mode": image_mode,
        "image_size_hw": list(image_size_of(image_mode, vanilla.config.vision_config.image_size)),
        "crops": inputs["crops"],
        "image_tokens": inputs["image_tokens"],
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "times_s": times,
        "median_s": {p: {n: statistics.median(v) for n, v in times[p].items()} for p in phases},
        # median over repetitions of patched / vanilla within the repetition (robust to slow drifts in load)
        "paired_ratio": {
            p: statistics.median(b / a for a, b in zip(times[p]["vanilla"], times[p]["patched"])) for p in phases
        },
        "paired_range": {
            p: [f(b / a for a, b in zip(times[p]["vanilla"], times[p]["patched"])) for f in (min, max)] for p in phases
        },
    }
    if args.memory:
        release_free_memory()
        weights = {name: weight_bytes(model) for name, model in models.items()}
        result["weight_bytes"] = weights
        peaks: dict[str, dict[str, int]] = {}
        for phase in phases:
            peaks[phase] = {}
            for name, model in models.items():
                if phase == "prefill":
                    fn = lambda: prefill(model, inputs)  # noqa: E731
                elif phase == "decode":
                    cache = _cache_of(prefill(model, inputs))
                    fn = lambda: decode_step(model, inputs, cache, 0)  # noqa: E731
                else:
                    fn = lambda: train_step(model, inputs)  # noqa: E731
                peaks[phase][name] = peak_bytes(fn, device)
        result["step_peak_bytes"] = peaks
        result["peak_bytes"] = {p: {n: weights[n] + b for n, b in v.items()} for p, v in peaks.items()}
    if args.flops:
        result["flops"] = {
            phase: {
                name: flops(lambda: (prefill if phase == "prefill" else train_step)(model, inputs))
                for name, model in models.items()
            }
            for phase in ("prefill", "train")
            if phase in phases
        }
    del vanilla, patched
    models.clear()
    inputs = None  # free the batch before measuring what is left
    release_free_memory()
    return result


def _ratio(pair: dict) -> float:
    return pair["patched"] / pair["vanilla"] if pair["vanilla"] else float("nan")


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"preset {meta['preset']}, {meta.get('manager_type', 'static')} Managers, injection={meta['injection']}, "
        f"{meta['dtype']} on {meta['device']}"
        f" ({meta['threads']} threads), attn={meta['attn']}; median of {meta['repeats']} (train: {meta['train_repeats']})"
        f" after {meta['warmup']} warm-up; prefill/train interleaved by {meta['interleave']}"
        f"; train step {'with' if meta['gradient_checkpointing'] else 'without'} gradient checkpointing"
        f"; torch {meta['torch']}, transformers {meta['transformers']}; malloc: {meta['malloc']}",
        "ratio: patched / vanilla of the medians; paired: median (and range) of patched / vanilla within a repetition"
        + ("; lockstep pairs: read paired" if meta["interleave"] != "run" else ""),
        f"{'image':<20}{'measure':<22}{'vanilla':>12}{'patched':>12}{'ratio':>8}{'paired':>8}  {'range':<13}",
    ]
    units = {"prefill": ("prefill (s)", 1.0), "decode": ("decode step (ms)", 1e3), "train": ("train step (s)", 1.0)}
    for result in report["results"]:
        label = f"{result['image_mode']}"
        unit = "frame" if video_frames(result["image_mode"]) else "crop"
        detail = f"{result['crops']} {unit}{'s' if result['crops'] > 1 else ''}, {result['image_tokens']} tok"
        rows = []
        for phase, pair in result["median_s"].items():
            name, scale = units[phase]
            low, high = result["paired_range"][phase]
            paired = f"{result['paired_ratio'][phase]:>8.3f}  {low:.3f}-{high:.3f}"
            rows.append((name, pair["vanilla"] * scale, pair["patched"] * scale, _ratio(pair), "{:>12.3f}", paired))
        for phase, pair in result.get("peak_bytes", {}).items():
            rows.append(
                (
                    f"peak mem {phase} (MiB)",
                    pair["vanilla"] / 2**20,
                    pair["patched"] / 2**20,
                    _ratio(pair),
                    "{:>12.0f}",
                    "",
                )
            )
        for phase, pair in result.get("flops", {}).items():
            rows.append(
                (f"GFLOP {phase}", pair["vanilla"] / 1e9, pair["patched"] / 1e9, _ratio(pair), "{:>12.1f}", "")
            )
        for index, (name, vanilla, patched, ratio, fmt, paired) in enumerate(rows):
            first = label if index == 0 else (detail if index == 1 else "")
            lines.append(
                f"{first:<20}{name:<22}" + fmt.format(vanilla) + fmt.format(patched) + f"{ratio:>8.3f}" + paired
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="half-0.5b")
    parser.add_argument(
        "--images",
        default=None,
        help=f"comma-separated image modes from {','.join(IMAGE_MODES)}, or videoN (one video of N frames; "
        "video = video8,video32) (default: per preset)",
    )
    parser.add_argument("--injection", choices=("llm", "projector"), default="llm")
    parser.add_argument(
        "--manager-type",
        choices=("static", "bridge", "tower"),
        default="static",
        help="the Managers measured (bridge: each reads one of the top len(llm_layers) selected layers)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    parser.add_argument(
        "--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation of both towers"
    )
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of prefill,decode,train")
    parser.add_argument("--repeats", type=int, default=5, help="measured repetitions (median reported)")
    parser.add_argument(
        "--train-repeats",
        type=int,
        default=None,
        help="measured repetitions of the (slow) train step (default: --repeats)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions first")
    parser.add_argument(
        "--interleave",
        choices=("auto", "layer", "run"),
        default="auto",
        help="'layer' runs the two models' prefill and train steps in lockstep, alternating one layer at a time "
        "(benchmarks/lockstep.py: drifts in machine speed cancel; both train steps' activations are alive at once, "
        "so without gradient checkpointing it needs twice the memory); 'run' times whole steps one after the other; "
        "'auto': 'layer' on CPU ('layer' for prefill and 'run' for train with --no-gradient-checkpointing), "
        "'run' on CUDA",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train step with activation checkpointing of every layer, as the recipes (configs/recipes/stage*.yaml) "
        "and the authors' released scripts train (default: on)",
    )
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps timed per repetition (median)")
    parser.add_argument(
        "--full-logits",
        action="store_true",
        help="train step: logits and loss at every position (HF's default; ~2.3 GB of fp32 logits per 3.7k tokens at "
        "vocab 152k) instead of only the text after the image",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: keep glibc's default malloc settings (by default the script restarts itself with STEADY_MALLOC)",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="also write the full report (raw times) as JSON ('-': stdout)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every repetition to stderr")
    args = parser.parse_args(argv)
    requested = args.images.split(",") if args.images else PRESETS[args.preset].images
    args.images = tuple(mode for item in requested for mode in (VIDEO_MODES if item == "video" else (item,)))
    args.phases = tuple(args.phases.split(","))
    videos = tuple(m for m in args.images if m.startswith("video") and m[5:].isdigit() and int(m[5:]) > 0)
    for value, allowed, name in ((args.images, IMAGE_MODES + videos, "--images"), (args.phases, PHASES, "--phases")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {','.join(allowed)}")
    args.train_repeats = args.repeats if args.train_repeats is None else args.train_repeats
    on_cpu = resolve_device(args.device).type == "cpu"
    if args.interleave == "layer" and not on_cpu:
        parser.error("--interleave layer times slices on the host clock: CPU only (use --interleave run on CUDA)")
    if args.interleave == "auto":
        args.interleave = (
            "run" if not on_cpu else ("layer" if args.gradient_checkpointing else "layer (prefill), run (train)")
        )
    args.lockstep_phases = {"layer": ("prefill", "train"), "run": ()}.get(args.interleave, ("prefill",))
    if args.repeats < 1 or args.train_repeats < 1 or args.warmup < 0 or args.decode_steps < 1:
        parser.error("--repeats, --train-repeats and --decode-steps must be >= 1, --warmup >= 0")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def restart_with_steady_malloc(args) -> None:
    """CPU runs on glibc: re-run this script once with STEADY_MALLOC in GLIBC_TUNABLES (read at process start)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.system_malloc or resolve_device(args.device).type != "cpu" or platform.libc_ver()[0] != "glibc":
        return
    if STEADY_MALLOC in tunables:
        return
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, STEADY_MALLOC]))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    import transformers

    report = {
        "meta": {
            "preset": args.preset,
            "injection": args.injection,
            "manager_type": args.manager_type,
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(),
            "malloc": os.environ.get("GLIBC_TUNABLES") or "system default",
            "attn": args.attn,
            "repeats": args.repeats,
            "train_repeats": args.train_repeats,
            "warmup": args.warmup,
            "interleave": args.interleave,
            "gradient_checkpointing": args.gradient_checkpointing,
            "decode_steps": args.decode_steps,
            "train_logits": "all positions" if args.full_logits else "text after the image",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": " ".join([os.path.basename(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)]),
        },
        "results": [],
    }
    for image_mode in args.images:
        report["results"].append(run_image_mode(args, preset, image_mode, device, dtype))
    for result in report["results"]:
        result["ratios"] = {
            kind: {p: _ratio(pair) for p, pair in result.get(kind, {}).items()}
            for kind in ("median_s", "peak_bytes", "flops")
        }
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    restart_with_steady_malloc(parse_args())
    main()
