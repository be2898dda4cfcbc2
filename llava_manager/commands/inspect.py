"""`llava-manager inspect MODEL [--out weights.png]`: the learned Manager weights, as a table and a heatmap."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  llava-manager inspect outputs/demo/manager --out weights.png
  llava-manager inspect LooperXX/LLaVA-OV-Manager --subfolder "Baseline + Grid + Manager" --out released.png

Each cell is mean |w| over channels for one Manager (row: the LLM layer it feeds, or "projector") and one
selected SigLIP layer (column: its hidden_states index), like the paper's weight figures. Static Managers
show |layer_scores|; adaptive ones their learned gate |zero_gate| (the per-token scores depend on the
input). The Manager at LLM layer 0 has no weight for the last selected layer, as released ("-").
Bridge Managers show mean |layer_scale| in the one layer each bridges; tower Managers their softmax layer
weights (rows sum to 1) with the temperature (tau) and mean |gate|. For both, the PNG adds a panel with each
Manager's per-channel scale or gate.
"""


def register(subparsers) -> None:
    from ._common import add_debug_flag

    parser = subparsers.add_parser(
        "inspect",
        help="show the learned Manager weights (terminal table; --out for a PNG heatmap)",
        description="Print a table of the learned Manager weights of a checkpoint (mean |w| over channels per "
        "injection layer and vision layer) and, with --out, draw them as a heatmap. Works for every Manager type "
        "(static, adaptive, bridge, tower) and both injection sites.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub repo id")
    parser.add_argument("--out", default=None, metavar="PNG", help="write the heatmap to this PNG file")
    parser.add_argument("--subfolder", default=None, help='folder inside MODEL, e.g. "Baseline + Grid + Manager"')
    parser.add_argument("--title", default=None, help="heatmap title (default: Manager type and injection site)")
    add_debug_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import CommandError
    from ..inspect_weights import format_table, load_manager_weights, plot_manager_weights
    from ._common import check_model_argument, quiet_transformers

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix.lower() != ".png":
            raise CommandError(f"--out {args.out}: the heatmap is a PNG; give a file name ending in .png")
        if out.is_dir():
            raise CommandError(f"--out {args.out} is a folder; give a file name ending in .png")
        if not out.parent.exists():
            raise CommandError(f"--out {args.out}: folder {out.parent} does not exist")
    check_model_argument(args.model)
    quiet_transformers(args.debug)
    weights = load_manager_weights(args.model, args.subfolder)
    print(format_table(weights))
    if out is not None:
        plot_manager_weights(weights, out, title=args.title)
        print(f"heatmap written to {out}")
    else:
        print("(add --out weights.png for a heatmap)")
    return 0
