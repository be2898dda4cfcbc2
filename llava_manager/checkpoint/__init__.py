"""Checkpoints: find them (local folder or Hub), tell their format, read and check weights, convert the authors'
original LLaVA-NeXT format, keep conversions in a cache, and load any of them with one call.

    files.py       which files make up a checkpoint folder
    weights.py     find, check and read weight files (safetensors; pickle only on opt-in)
    formats.py     HF format or original format
    source.py      resolve a folder or Hub repo id (huggingface_hub)
    original.py    the original format -> a patched transformers model (config and key mapping)
    assembly.py    the processor of a converted checkpoint
    folders.py     folders that appear whole or not at all
    conversion.py  original folder -> HF-format folder (model + processor)
    cache.py       where conversions are kept
    loading.py     `from_pretrained`
    compose.py     a fresh LLaVA-OV from a SigLIP and an LM checkpoint (`llava-manager build`)
    managers_only.py  Managers-only weights: `save_managers` / `load_managers` (PEFT-style, < 1 MB)
"""

from .conversion import convert_checkpoint
from .formats import CheckpointFormat, detect_format
from .loading import from_pretrained
from .original import load_original
from .source import ResolvedSource, resolve

__all__ = [
    "CheckpointFormat",
    "ResolvedSource",
    "convert_checkpoint",
    "detect_format",
    "from_pretrained",
    "load_original",
    "resolve",
]
