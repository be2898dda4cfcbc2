"""Deprecated: the original-format conversion moved to `llava_manager.checkpoint.original`. Old names still
resolve here."""

from ._moved import forward_moved_names

__getattr__ = forward_moved_names(
    __name__,
    {
        "ConversionError": "llava_manager.errors",
        "is_original_format": "llava_manager.checkpoint.formats",
        "has_managers": "llava_manager.checkpoint.formats",
        "convert_config": "llava_manager.checkpoint.original",
        "map_key": "llava_manager.checkpoint.original",
        "load_original": "llava_manager.checkpoint.original",
        "KNOWN_VISION_TOWERS": "llava_manager.checkpoint.original",
    },
)
