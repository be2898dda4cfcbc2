"""One training run of the demo, in its own process:
`python -m llava_manager.demo.worker RECIPE OVERRIDES_JSON PROGRESS_FILE`.

It loads the recipe (the demo uses the shipped `demo` one) with the overrides (a JSON object of recipe keys) and calls the training
entry point, `llava_manager.train.main.train`. After every logged step it appends `{"step", "loss"}` as a JSON
line to PROGRESS_FILE, which the demo reads to show progress. A process of its own keeps what training changes
(the torch.distributed group, DeepSpeed's state, environment variables, thread counts) out of the caller.
Exit status: 0 done, 2 a recipe / data error (message on stderr), 1 anything else (traceback on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m llava_manager.demo.worker RECIPE OVERRIDES_JSON PROGRESS_FILE", file=sys.stderr)
        return 2
    recipe, overrides, progress_file = argv[0], json.loads(argv[1]), Path(argv[2])

    from transformers import TrainerCallback

    from ..errors import ManagerError
    from ..train.main import train
    from ..train.recipe import load_recipe

    class ReportProgress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                with progress_file.open("a") as handle:
                    handle.write(json.dumps({"step": state.global_step, "loss": float(logs["loss"])}) + "\n")

    try:
        result = train(load_recipe(recipe, overrides), callbacks=[ReportProgress()])
    except ManagerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with progress_file.open("a") as handle:
        handle.write(json.dumps({"done": str(result.output_dir)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
