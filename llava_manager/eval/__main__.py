"""`python -m llava_manager.eval ARGS...`: lmms-eval's own CLI with our model registered.

Works where the `lmms_eval.models` entry point is not installed (a source checkout, PYTHONPATH).
Everything after the module name goes to lmms-eval unchanged, e.g.

    python -m llava_manager.eval --model llava_manager \\
        --model_args pretrained=LooperXX/LLaVA-OV-Manager,subfolder="Baseline + Grid + Manager" \\
        --tasks mmmu_val --batch_size 1 --output_path logs/
    accelerate launch --num_processes 8 -m llava_manager.eval --model llava_manager ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from ..extras import missing_modules

    if missing_modules("eval"):
        sys.exit(f"evaluation needs {', '.join(missing_modules('eval'))}: pip install 'llava-manager[eval]'")

    from . import register

    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    sys.argv = ["lmms-eval", *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    main()
    sys.exit(0)
