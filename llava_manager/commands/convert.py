"""`llava-manager convert SRC OUT [--subfolder ...]`: an original-format checkpoint -> an HF-format folder.

SRC is a local folder or a Hub repo id. OUT then loads with
`AutoModelForImageTextToText.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)` after
`import llava_manager`. OUT appears only once everything is written.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  llava-manager convert LooperXX/LLaVA-OV-Manager ./ov-manager-grid --subfolder "Baseline + Grid + Manager"
  llava-manager convert ./my-original-checkpoint ./converted --tokenizer Qwen/Qwen2-0.5B-Instruct
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original LLaVA-OV(-Manager) checkpoint to an HF-format folder",
        description="Convert an original-format LLaVA-OV(-Manager) checkpoint (local folder or Hub repo) into an "
        "HF-format folder that AutoModelForImageTextToText / AutoProcessor load after `import llava_manager`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="local checkpoint folder or Hub repo id")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--subfolder", default=None, help='folder inside SRC, e.g. "Baseline + Grid + Manager"')
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face download cache (default: huggingface_hub's)")
    parser.add_argument("--token", default=None, help="Hub token for private or gated repos")
    parser.add_argument("--local-files-only", action="store_true", help="use the download cache only, no network")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id, if SRC has no tokenizer files")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle-only weights (*.bin), read with torch.load(weights_only=True); refused by default",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress"
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..checkpoint import convert_checkpoint, resolve

    source = resolve(
        args.src,
        args.subfolder,
        args.revision,
        cache_dir=args.cache_dir,
        token=args.token,
        local_files_only=args.local_files_only,
        allow_pickle=args.allow_pickle,
    )
    out = convert_checkpoint(
        source,
        args.out,
        tokenizer=args.tokenizer,  # a folder or a Hub id (AutoTokenizer fetches only the tokenizer files)
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"converted {source.description} -> {out}", file=sys.stderr)
    print(
        f"load it with: import llava_manager; from transformers import AutoModelForImageTextToText, AutoProcessor; "
        f"AutoModelForImageTextToText.from_pretrained({str(out)!r}), AutoProcessor.from_pretrained({str(out)!r})",
        file=sys.stderr,
    )
    return 0
