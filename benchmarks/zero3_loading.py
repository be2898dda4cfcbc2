"""Peak host memory (RSS) per rank while a ZeRO-3 run loads its model, before and after partitioning at load.

It writes a random LLaVA-OV checkpoint whose LLM is large enough for its weights to dominate (default: width 1536,
16 layers, 1.3 GB in fp32, saved in 200 MB shards like released checkpoints), then runs the training entry point
(load, patch, freeze, one step training only the Managers) on N CPU processes in up to five settings: "before" (the
old code: `zero3_init: false`, every rank loads the whole model, glibc's adaptive mmap threshold), "whole"
(`zero3_init: false` today: with `train.host_memory`'s fixed threshold), "partitioned" (`zero3_init: true`, the
default), FSDP2 without / with `cpu_ram_efficient_loading` ("fsdp", "fsdp-efficient") and sharded at load
("fsdp-sharded", `fsdp_loading: sharded`; `--settings`). It
reports per rank the RSS after imports and the peaks of RSS and of anonymous RSS (the process's own memory, without
mmap'ed checkpoint pages) while loading and up to the end of the first training step, with the ratios to "before".

    python benchmarks/zero3_loading.py                      # 2 processes, ~4 minutes on 2 cores
    python benchmarks/zero3_loading.py --text-hidden 2048 --text-layers 16 --json rss.json
    python benchmarks/zero3_loading.py --settings before,fsdp,fsdp-efficient
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_mb() -> dict[str, float]:
    """VmRSS (all resident pages, file-backed included) and RssAnon (the process's own memory), in MB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon"):
            values[key] = int(line.split()[1]) / 1024
    return values


class PeakSampler:
    """Samples /proc/self/status every 20 ms in a thread: the peaks of VmRSS and RssAnon while it runs."""

    def __init__(self):
        import threading

        self.peaks = _status_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            for key, value in _status_mb().items():
                self.peaks[key] = max(self.peaks.get(key, 0.0), value)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(args) -> None:
    """One rank: import everything, note memory, build the trainer (the model loads here) and run one step (DeepSpeed
    partitions the model here if it did not at load; only the Managers train, so optimizer states stay small)."""
    import time

    import torch.distributed as dist

    from llava_manager.train import host_memory
    from llava_manager.train.main import build_trainer
    from llava_manager.train.recipe import load_recipe

    rank = int(os.environ["RANK"])
    sharding, allocator = SETTINGS[args.setting]
    if allocator == "glibc":  # the code before host_memory: glibc's adaptive mmap threshold
        host_memory.return_freed_tensors = lambda *a, **k: False
    after_imports = _status_mb()
    recipe = load_recipe(
        "tiny_cpu",
        [
            *("--model_config", "null", "--model_name_or_path", args.checkpoint, "--processor", "null"),
            *("--data_path", str(Path(args.out) / "data" / "data.json")),
            *("--image_folder", str(Path(args.out) / "data" / "images")),
            *("--output_dir", str(Path(args.out) / f"run-{args.setting}")),
            *sharding,
            *("--max_steps", "1", "--save_steps", "0"),
            *("--per_device_train_batch_size", "1", "--check_images", "none", "--manager.llm_layers", "[0]"),
            *("--train_parts", "manager"),
        ],
    )
    from transformers import TrainerCallback

    sampler = PeakSampler()
    at_ready = {}

    class AtTrainBegin(TrainerCallback):  # DeepSpeed's engine exists (the model is partitioned), no step ran yet
        def on_train_begin(self, *_, **__):
            at_ready.update(sampler.peaks)

    start = time.perf_counter()
    trainer, _ = build_trainer(recipe, callbacks=[AtTrainBegin()])
    at_load = dict(sampler.peaks)
    loaded = time.perf_counter()
    trainer.train()
    peaks = sampler.stop()
    result = {
        "rank": rank,
        "after_imports_mb": after_imports["VmRSS"],
        "after_imports_anon_mb": after_imports["RssAnon"],
        "load_peak_mb": at_load["VmRSS"],
        "load_peak_anon_mb": at_load["RssAnon"],
        "ready_peak_mb": at_ready["VmRSS"],
        "ready_peak_anon_mb": at_ready["RssAnon"],
        "peak_mb": peaks["VmRSS"],
        "peak_anon_mb": peaks["RssAnon"],
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": loaded - start,
        "train_s": time.perf_counter() - loaded,
    }
    Path(args.out, f"{args.setting}-rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def write_checkpoint(folder: Path, text_hidden: int, text_layers: int) -> float:
    """A random LLaVA-OV (tiny SigLIP, a wide LLM) with its processor; returns the weights' size in MB."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_manager.testing.tiny import tiny_config, tiny_processor

    config = tiny_config(text_hidden=text_hidden, text_layers=text_layers)
    with torch.device("cpu"):
        model = LlavaOnevisionForConditionalGeneration(config)
    model.save_pretrained(folder, max_shard_size="200MB")
    tiny_processor(config).save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


#: name -> (recipe overrides, allocator): ZeRO-3 before this change, its old loading path today, loading partitioned
#: today; FSDP2 without and with accelerate's cpu_ram_efficient_loading (only rank 0's values are broadcast), and
#: sharded by transformers while loading (`fsdp_loading: sharded`: each rank reads only its shard)
FSDP2 = ("--deepspeed", "null", "--fsdp", "fsdp2")
SETTINGS = {
    "before": (("--deepspeed", "zero3", "--zero3_init", "false"), "glibc"),
    "whole": (("--deepspeed", "zero3", "--zero3_init", "false"), "fixed"),
    "partitioned": (("--deepspeed", "zero3", "--zero3_init", "true"), "fixed"),
    "fsdp": ((*FSDP2, "--fsdp.cpu_ram_efficient_loading", "false"), "fixed"),
    "fsdp-efficient": ((*FSDP2, "--fsdp.cpu_ram_efficient_loading", "true"), "fixed"),
    "fsdp-sharded": ((*FSDP2, "--fsdp_loading", "sharded"), "fixed"),
}


def run(name: str, args, checkpoint: Path, out: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.processes),
        __file__,
        "--worker",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--setting",
        name,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit(f"{name}: no result after {args.timeout} s") from None
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{output[-4000:]}")
    return [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(args.processes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, default=1536, help="LLM width (default 1536)")
    parser.add_argument("--text-layers", type=int, default=16, help="LLM layers (default 16)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per setting (default 900)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--settings", default="before,whole,partitioned", help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}: choose from {', '.join(SETTINGS)}")

    with tempfile.TemporaryDirectory(prefix="zero3-loading-") as tmp:
        tmp = Path(tmp)
        from llava_manager.testing.synthetic import write_shapes_dataset

        write_shapes_dataset(tmp / "data", 4, seed=0, kinds=("single",))  # tmp/data/data.json + images/
        weights_mb = write_checkpoint(tmp / "checkpoint", args.text_hidden, args.text_layers)
        print(f"checkpoint: LLM width {args.text_hidden} x {args.text_layers} layers, {weights_mb:.0f} MB of weights")
        report = {"weights_mb": weights_mb, "processes": args.processes, "results": {}}
        for name in names:
            report["results"][name] = run(name, args, tmp / "checkpoint", tmp)
    results = report["results"]
    print("MB per rank. before: zero3_init false with glibc's adaptive mmap threshold (the code before this change);")
    print("whole: zero3_init false, fixed threshold; partitioned: zero3_init true (the default), fixed threshold;")
    print("fsdp / fsdp-efficient / fsdp-sharded: FSDP2 without / with cpu_ram_efficient_loading / sharded at load.")
    print("load = until the Trainer exists; ready = until training starts (the model is sharded: the")
    print("loading peak); step = up to the end of the first step; anon = the process's own memory (RssAnon), the")
    print("rest of RSS is file-backed (shared libraries, mmap'ed checkpoint pages: page cache)")
    peaks = " | ".join(f"{p + ' peak (anon)':>16}" for p in ("load", "ready", "step"))
    print(f"{'rank':>4} | {'setting':>11} | {'imports':>7} | {peaks} | load s | step s")
    for name in names:
        for row in results[name]:
            print(
                f"{row['rank']:>4} | {name:>11} | {row['after_imports_mb']:>7.0f} | "
                f"{row['load_peak_mb']:>7.0f} ({row['load_peak_anon_mb']:>5.0f}) | "
                f"{row['ready_peak_mb']:>7.0f} ({row['ready_peak_anon_mb']:>5.0f}) | "
                f"{row['peak_mb']:>7.0f} ({row['peak_anon_mb']:>5.0f}) | {row['load_s']:>6.1f} | {row['train_s']:>6.1f}"
            )
    for after_name in [n for n in names if n != "before" and "before" in names]:
        for key, label in (
            ("ready_peak_mb", "loading peak RSS"),
            ("ready_peak_anon_mb", "loading peak anonymous RSS"),
            ("peak_mb", "peak RSS to the end of step 1"),
        ):
            ratios = [a[key] / b[key] for a, b in zip(results[after_name], results["before"])]
            report[f"ratio_{after_name}_{key}"] = ratios
            print(f"{label}, {after_name} / before, per rank: " + ", ".join(f"{r:.2f}" for r in ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
