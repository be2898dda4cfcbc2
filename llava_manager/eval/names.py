"""The lmms-eval model id and class path, imported by the package and by the manifest (lmms-eval loads the
manifest while its own registry is initialising, so this module imports nothing)."""

MODEL_ID = "llava_manager"
MODEL_CLASS_PATH = "llava_manager.eval.model.LlavaManager"
