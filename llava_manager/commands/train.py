"""`llava-manager train [RECIPE] [--key value ...]`: the same as `python -m llava_manager.train`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train LLaVA-OV-Manager with a recipe (HF Trainer + DeepSpeed)",
        usage="llava-manager train [RECIPE] [--key value ...] [--print-recipe]",
        description="Train with a recipe (a YAML file or a shipped name; default tiny_cpu). Any recipe key can be "
        "overridden as --key value. `llava-manager train --help` lists the shipped recipes and the keys.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="list the recipe keys")
    parser.set_defaults(func=run, accepts_extra=True)


def run(args) -> int:
    from llava_manager.train.main import main

    argv = list(args.extra)
    if getattr(args, "help", False):
        argv.append("--help")
    return main(argv)
