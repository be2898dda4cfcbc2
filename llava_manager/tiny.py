"""Deprecated: the tiny models moved to `llava_manager.testing.tiny`. Old names still resolve here."""

from ._moved import forward_moved_names

__getattr__ = forward_moved_names(
    __name__,
    dict.fromkeys(("tiny_config", "tiny_model", "tiny_processor", "tiny_tokenizer"), "llava_manager.testing.tiny"),
)
