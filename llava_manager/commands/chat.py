"""`llava-manager chat MODEL --image PATH [--image ...] "question"`: ask a model about images, streaming the answer."""

from __future__ import annotations

import argparse
import math

EPILOG = """examples:
  llava-manager chat outputs/demo/manager --image outputs/demo/data/images/heldout-0000.png "What color is the shape?"
  llava-manager chat LooperXX/LLaVA-OV-Manager --subfolder "Baseline + Grid + Manager" --image cat.jpg "What is this?"
  llava-manager chat ./converted --image a.png --image b.png "What differs between the two images?"
  llava-manager chat outputs/my-model --video clip.mp4 --frames 32 "What happens in the video?"
  llava-manager chat outputs/my-model/managers --base llava-hf/llava-onevision-qwen2-0.5b-ov-hf --image a.png "Describe it."

MODEL is anything llava_manager.from_pretrained loads: a folder in HF format (written by `llava-manager
train`, `convert` or save_pretrained), an original-format LLaVA-OV(-Manager) folder (converted on the fly
and cached), or a Hub repo id; or a Managers-only folder / repo (save_managers, `managers/` of a training run)
with --base naming the model to put them on (default: the base recorded in its manager_config.json).
Images go before the question, as LLaVA-OneVision was trained.
"""


def register(subparsers) -> None:
    from ._common import add_debug_flag

    parser = subparsers.add_parser(
        "chat",
        help="ask a LLaVA-OV(-Manager) model a question about images (streams the answer)",
        description="Load a model (any format llava_manager.from_pretrained reads, or a Hub id) and answer one "
        "question about the given images, printing the answer as it is generated.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub repo id")
    parser.add_argument("question", metavar="QUESTION", help="the question (quote it)")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="image file (PNG, JPEG, ...); repeat for several images; none = a text-only question",
    )
    parser.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="video file (decoded with PyAV) or folder of frame images; goes after the images; repeatable",
    )
    parser.add_argument(
        "--frames", type=int, default=32, help="frames sampled uniformly from each video (default 32, as LLaVA-OV)"
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="BASE",
        help="MODEL holds Managers only (save_managers): the base checkpoint or Hub id to load them onto",
    )
    parser.add_argument("--subfolder", default=None, help='folder inside MODEL, e.g. "Baseline + Grid + Manager"')
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default, reproducible); > 0 = sample at this temperature",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (with --temperature > 0)")
    parser.add_argument(
        "--no-stream", action="store_true", help="print the whole answer at the end instead of streaming"
    )
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..chat import ask, load_images, load_video
    from ..errors import CommandError
    from ._common import check_model_argument, load_model, quiet_transformers

    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens {args.max_new_tokens}: use 1 or more")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CommandError(f"--temperature {args.temperature}: use 0 (greedy) or a positive finite number")
    if not args.question.strip():
        raise CommandError(f"the question is empty ({args.question!r}): ask something")
    if "<image>" in args.question or "<video>" in args.question:
        raise CommandError(
            "leave <image> / <video> out of the question: pass each with --image / --video, they go first"
        )
    if args.frames < 1:
        raise CommandError(f"--frames {args.frames}: sample 1 or more frames")
    check_model_argument(args.model)
    images = load_images(args.image)  # missing or unreadable images fail here, before the model loads
    videos = [load_video(path, args.frames) for path in args.video]
    quiet_transformers(args.debug)
    model, processor = load_model(args.model, args.subfolder, args.debug, base=args.base)
    if args.seed is not None:
        import transformers

        transformers.set_seed(args.seed)
    answer = ask(
        model,
        processor,
        images,
        args.question,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        stream=not args.no_stream,
        videos=videos,
    )
    if args.no_stream:
        print(answer)
    return 0
