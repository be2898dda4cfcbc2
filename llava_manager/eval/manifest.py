"""The lmms-eval `ModelManifest` for the `lmms_eval.models` entry-point group.

setup.cfg:
    [options.entry_points]
    lmms_eval.models =
        llava_manager = llava_manager.eval.manifest:MANIFEST

lmms-eval imports this module while `lmms_eval.models` is still initialising, so it imports
only `lmms_eval.models.registry_v2` (already loaded by then) and nothing of ours that is heavy.
"""

from lmms_eval.models.registry_v2 import ModelManifest

from .names import MODEL_CLASS_PATH, MODEL_ID

MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
