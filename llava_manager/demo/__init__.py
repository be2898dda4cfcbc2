"""`llava-manager demo`: train a tiny LLaVA-OV with Managers on synthetic shapes, on CPU, in a few minutes.

    from llava_manager.demo import run_demo
    result = run_demo("outputs/demo", steps=60, compare=True)

See `pipeline.py` for the steps and `shapes.py` for the data.
"""

from .pipeline import DEFAULT_STEPS, DEFAULT_VIDEO_STEPS, DemoError, DemoResult, HeldoutScore, RunResult, run_demo
from .shapes import DemoData, write_demo_dataset

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_VIDEO_STEPS",
    "DemoData",
    "DemoError",
    "DemoResult",
    "HeldoutScore",
    "RunResult",
    "run_demo",
    "write_demo_dataset",
]
