"""Which files make up a checkpoint folder: the one list of names every loader, downloader and converter uses."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILES = ("config.json", "generation_config.json")
SAFETENSORS_FILES = ("*.safetensors", "*.safetensors.index.json")
PICKLE_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
#: any one of these says "a tokenizer is saved here"
TOKENIZER_ENTRY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
TOKENIZER_FILES = (*TOKENIZER_ENTRY_FILES, "merges.txt", "added_tokens.json", "special_tokens_map.json")
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
#: written last into every converted folder: its presence means the conversion finished
MARKER = "llava_manager_conversion.json"


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_ENTRY_FILES)


def folders_with_config(root: Path, depth: int = 2) -> list[str]:
    """Subfolders (up to `depth` levels down) that hold a config.json, for "did you mean" messages."""
    found = []
    for level in range(1, depth + 1):
        for config in Path(root).glob("/".join(["*"] * level) + "/config.json"):
            relative = config.parent.relative_to(root).as_posix()
            if not relative.startswith("."):
                found.append(relative)
    return sorted(found)
