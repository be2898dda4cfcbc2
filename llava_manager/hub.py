"""Deprecated: checkpoint loading moved to the `llava_manager.checkpoint` package. Old names still resolve here."""

from ._moved import forward_moved_names

__getattr__ = forward_moved_names(
    __name__,
    {
        "HubError": "llava_manager.errors",
        "ResolvedSource": "llava_manager.checkpoint.source",
        "resolve": "llava_manager.checkpoint.source",
        "allow_patterns": "llava_manager.checkpoint.source",
        "CheckpointFormat": "llava_manager.checkpoint.formats",
        "detect_format": "llava_manager.checkpoint.formats",
        "read_config": "llava_manager.checkpoint.formats",
        "check_weights": "llava_manager.checkpoint.weights",
        "atomic_directory": "llava_manager.checkpoint.folders",
        "convert_checkpoint": "llava_manager.checkpoint.conversion",
        "default_cache_dir": "llava_manager.checkpoint.cache",
        "cache_entry": "llava_manager.checkpoint.cache",
        "is_converted": "llava_manager.checkpoint.cache",
        "MARKER": "llava_manager.checkpoint.files",
        "from_pretrained": "llava_manager.checkpoint.loading",
    },
)
