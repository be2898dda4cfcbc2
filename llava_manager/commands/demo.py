"""`llava-manager demo`: train a small LLaVA-OV with Managers on synthetic shapes, on CPU (what `make demo` runs)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the whole pipeline on a small random LLaVA-OV in about two minutes on CPU, downloading nothing:

  1. draw a synthetic dataset (coloured shapes on the left or right; questions about colour,
     shape and position) with a held-out split;
  2. build the model from configs/models/demo.json, patch it with Managers and train it
     through the real entry point (`llava-manager train demo`, HF Trainer + DeepSpeed ZeRO-2);
  3. save it, reload it with llava_manager.from_pretrained, answer a held-out question and score
     all held-out questions (the accuracy is reported as it is, with the chance level);
  4. draw the learned Manager weights (PNG).

--compare also trains the unpatched model on the same data, steps and seed and draws both loss
curves in one PNG (the paper's baseline-vs-Manager comparison, in miniature: both models learn
this toy task, so it shows the pipeline, not the paper's gains). The output ends with the total
time and where everything was written.

--video does the same with short clips (6 frames: a shape sliding left or right, or staying put
and changing colour halfway) and asks whether and which way the shape moves and its colour at the
end; the Managers act on the video tokens. --train-images / --heldout-images then count clips.
"""


def register(subparsers) -> None:
    from ..demo.pipeline import DEFAULT_HELDOUT_IMAGES, DEFAULT_STEPS, DEFAULT_TRAIN_IMAGES, DEFAULT_VIDEO_STEPS
    from ._common import add_debug_flag

    parser = subparsers.add_parser(
        "demo",
        help="train a small LLaVA-OV with Managers on synthetic shapes, on CPU (what `make demo` runs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/demo",
        help="where everything goes (default outputs/demo; an earlier demo's output there is replaced)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per model (default {DEFAULT_STEPS}, {DEFAULT_VIDEO_STEPS} with --video)",
    )
    parser.add_argument("--compare", action="store_true", help="also train the unpatched model; plot both loss curves")
    parser.add_argument(
        "--video", action="store_true", help="train on synthetic clips and ask about motion (the video path)"
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=DEFAULT_TRAIN_IMAGES,
        help=f"training images, or clips with --video (default {DEFAULT_TRAIN_IMAGES})",
    )
    parser.add_argument(
        "--heldout-images",
        type=int,
        default=DEFAULT_HELDOUT_IMAGES,
        help=f"held-out images, 3 questions each, or clips, 2-3 each (default {DEFAULT_HELDOUT_IMAGES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, model init and training (default 0)")
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo
    from ..errors import CommandError

    for name in ("steps", "train_images", "heldout_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} {getattr(args, name)}: use 1 or more")
    run_demo(
        args.output_dir,
        steps=args.steps,
        compare=args.compare,
        train_images=args.train_images,
        heldout_images=args.heldout_images,
        seed=args.seed,
        video=args.video,
    )
    return 0
