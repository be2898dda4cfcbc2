"""A local stand-in of the Hub repo `LooperXX/LLaVA-OV-Manager`, built from the oracle's tiny checkpoints.

Four subfolders in the original LLaVA-NeXT format, like the released repo:

| subfolder | made from | Managers |
|---|---|---|
| `Baseline + Grid + Manager` | oracle `static_all_anyres` (anyres_max_9) | yes |
| `Baseline + Manager` | oracle `static_square` (square / flat) | yes |
| `Baseline + Grid` | `static_all_anyres` without the Manager keys and `mm_manager_*` fields | no |
| `Baseline` | `static_square` without them | no |

Each holds tokenizer files whose ids are the oracle's (README section 3), so the processor turns the
oracle's prompt text into the oracle's input ids. The tiny SigLIP's config sits at the repo root
(`mm_vision_tower` names it relative to the checkpoint, as in the oracle).

`populate_hub_cache` lays files out exactly as huggingface_hub's cache does (blobs, snapshots/<commit>,
refs/<revision>), so `snapshot_download` with `HF_HUB_OFFLINE=1` finds them through its real code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ORACLE_DIR = Path(__file__).parent / "fixtures" / "oracle"
REPO_ID = "LooperXX/LLaVA-OV-Manager"
TOWER = "tiny-siglip-patch14-384"
SUBFOLDERS = {
    "Baseline + Grid + Manager": ("static_all_anyres", True),
    "Baseline + Manager": ("static_square", True),
    "Baseline + Grid": ("static_all_anyres", False),
    "Baseline": ("static_square", False),
}
IMAGE_ID, VIDEO_ID, PAD_ID, IM_START_ID, IM_END_ID = 127, 123, 124, 125, 126


def oracle_vocabulary() -> list[str]:
    """128 token strings whose ids play the oracle's roles; content ids 30..119 are the words " t30".." t119"."""
    tokens = [f"<unused{i}>" for i in range(128)]
    tokens[0] = "<unk>"
    tokens[10], tokens[11], tokens[12], tokens[13] = "\n", "system", "user", "assistant"
    tokens[20:26] = ["You", " are", " a", " helpful", " assistant", "."]
    for k in range(30, 120):
        tokens[k] = f" t{k}"
    tokens[VIDEO_ID], tokens[PAD_ID], tokens[IM_START_ID], tokens[IM_END_ID], tokens[IMAGE_ID] = (
        "<video>",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
    )
    return tokens


def oracle_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(oracle_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9]+|\n|[^\sA-Za-z0-9]| "), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        model_max_length=16384,
    )


def oracle_prompt(ids: list[int]) -> str:
    """The text whose tokens are `ids` (the image placeholder -200 becomes `<image>`)."""
    vocabulary = oracle_vocabulary()
    return "".join("<image>" if i == -200 else vocabulary[i] for i in ids)


def write_checkpoint(
    case: str, dest: Path, *, managers: bool = True, tokenizer: bool = True, tower: bool = False
) -> Path:
    """An original-format checkpoint folder made from an oracle case (optionally without its Managers; `tower`:
    with the tiny vision tower's config beside it, where conversion looks for it)."""
    source = ORACLE_DIR / case / "checkpoint"
    dest.mkdir(parents=True, exist_ok=True)
    if tower:
        (dest.parent / TOWER).mkdir(exist_ok=True)
        shutil.copy(ORACLE_DIR / TOWER / "config.json", dest.parent / TOWER / "config.json")
    config = json.loads((source / "config.json").read_text())
    shutil.copy(source / "generation_config.json", dest / "generation_config.json")
    if managers:
        shutil.copy(source / "model.safetensors", dest / "model.safetensors")
    else:
        config = {k: v for k, v in config.items() if not k.startswith("mm_manager_")}
        config["architectures"] = ["LlavaQwenForCausalLM"]
        state = load_file(str(source / "model.safetensors"))
        state = {
            k: v for k, v in state.items() if not k.startswith(("model.manager.", "model.manager_layer_embedding"))
        }
        save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        oracle_tokenizer().save_pretrained(dest)
    return dest


def make_repo(root: Path) -> Path:
    """The stand-in repo as a plain folder: the four subfolders plus the tiny tower's config at the root."""
    for subfolder, (case, managers) in SUBFOLDERS.items():
        write_checkpoint(case, root / subfolder, managers=managers)
    (root / TOWER).mkdir(parents=True, exist_ok=True)
    shutil.copy(ORACLE_DIR / TOWER / "config.json", root / TOWER / "config.json")
    return root


def populate_hub_cache(cache_dir: Path, repo_dir: Path, *, repo_id: str = REPO_ID, revision: str = "main") -> str:
    """Put every file of `repo_dir` into an HF hub cache as `repo_id` at `revision`; returns the commit hash."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(repo_dir).rglob("*") if p.is_file())
    commit = hashlib.sha1(repr([(p.relative_to(repo_dir).as_posix(), p.stat().st_size) for p in files]).encode())
    commit = hashlib.sha1((commit.hexdigest() + revision).encode()).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = storage / "snapshots" / commit / file.relative_to(repo_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit


def files_under(folder: Path) -> list[str]:
    """Every file and folder left under `folder` (for "nothing left behind" checks)."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def zero_managers(model) -> None:
    with torch.no_grad():
        for name, parameter in model.model.manager.named_parameters():
            if "layer_scores" in name or "zero_gate" in name:
                parameter.zero_()
