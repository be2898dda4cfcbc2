"""`llava-manager build --vision SIGLIP --llm QWEN2 OUT`: a fresh LLaVA-OV from unimodal experts (stage 1's start)."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  llava-manager build --vision google/siglip-so400m-patch14-384 --llm Qwen/Qwen2-0.5B-Instruct outputs/base
  llava-manager train stage1 --data_path ... --image_folder ...     # starts from outputs/base

What OUT holds: SigLIP without its last layer (as LLaVA-OV: 27 -> 26 layers), the LLM and its LM head as
they were, a new randomly initialised mlp2x_gelu projector and image_newline (--seed), the LLM's tokenizer
with <image> and <video> added (embedding rows added only if the vocabulary has no spare ones), the
processor (anyres_max_9, grids (1x1),...,(6x6)) and the ChatML chat template, and compose_info.json. It
has no Managers: `stage1` adds the recipe's and trains them with the projector, both towers frozen.
"""


def register(subparsers) -> None:
    from ._common import add_debug_flag

    parser = subparsers.add_parser(
        "build",
        help="compose a fresh LLaVA-OV from a SigLIP and a Qwen2 checkpoint (the start of stage 1)",
        description="Compose a new HF-format LLaVA-OneVision folder from a SigLIP vision model and a causal LM "
        "(folders or Hub ids), with a new projector and image_newline, as the paper's stage 1 starts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vision", required=True, metavar="DIR_OR_ID", help="SigLIP vision model (folder or Hub id)")
    parser.add_argument("--llm", required=True, metavar="DIR_OR_ID", help="causal LM with its tokenizer (Qwen2)")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty, unless --overwrite)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="default: the LLM's"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new projector and image_newline")
    parser.add_argument(
        "--keep-last-vision-layer", action="store_true", help="keep every SigLIP layer (LLaVA-OV drops the last)"
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face download cache (default: huggingface_hub's)")
    parser.add_argument("--token", default=None, help="Hub token for private or gated repos")
    parser.add_argument("--local-files-only", action="store_true", help="use the download cache only, no network")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..checkpoint.compose import compose_llava_onevision
    from ._common import quiet_transformers

    quiet_transformers(args.debug)
    hub = {"cache_dir": args.cache_dir, "token": args.token, "local_files_only": args.local_files_only}
    info = compose_llava_onevision(
        args.vision,
        args.llm,
        args.out,
        dtype=args.dtype,
        drop_last_vision_layer=not args.keep_last_vision_layer,
        seed=args.seed,
        overwrite=args.overwrite,
        **{k: v for k, v in hub.items() if v},
    )
    added = ", ".join(info.added_tokens) or "none (the tokenizer had them)"
    print(
        f"built {args.out}: SigLIP {info.vision_layers_kept} of {info.vision_layers_source} layers, LLM "
        f"{info.llm_layers} layers, {info.new_parameters:,} new parameters (projector + image_newline), tokens "
        f"added: {added}, {info.embedding_rows} embedding rows, {info.dtype}",
        file=sys.stderr,
    )
    print(f"next: llava-manager train stage1 --model_name_or_path {args.out} --data_path ... --image_folder ...")
    return 0
