"""lmms-eval integration: the `llava_manager` model for lmms-eval >= 0.7.3.

    pip install "llava-manager[eval]"
    lmms-eval --model llava_manager --model_args pretrained=PATH_OR_HUB_ID[,subfolder=...] --tasks ...
    python -m llava_manager.eval --model llava_manager ...   # same, even without the entry point

The model is found by lmms-eval through the entry-point group `lmms_eval.models`
(`llava_manager.eval.manifest:MANIFEST`); the launcher registers it by hand. This package
imports nothing heavy: lmms-eval loads the manifest while it builds its own model registry.
"""

from __future__ import annotations

from .names import MODEL_CLASS_PATH, MODEL_ID  # noqa: F401  (re-exported)


def register(overwrite: bool = True) -> None:
    """Register the model with lmms-eval's registry in this process (what the entry point does)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from .manifest import MANIFEST

    MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=overwrite)
