"""Deprecated: the tiny models moved to `llava_manager.testing.tiny`. Old names still resolve here."""

from ._moved import forward_moved_names

__getattr__ = forward_moved_names(
    __name__,
    {name: "llava_manager.testing.tiny" for name in ("tiny_config", "tiny_model", "tiny_processor", "tiny_tokenizer")},
)
