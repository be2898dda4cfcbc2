"""Load released checkpoints with one call: `llava_manager.from_pretrained(repo_or_path, subfolder=...)`.

Three steps, each its own function:

1. `resolve`: a local folder, or a Hub repo id fetched through `huggingface_hub` (its cache, offline mode,
   `revision`, subfolders with spaces and `+`), downloading only what loading needs (config, safetensors,
   tokenizer and processor files; pickle weights only on explicit opt-in).
2. `detect_format`: our HF format (`llava_onevision_manager`, or plain `llava_onevision`), loaded directly;
   or the original LLaVA-NeXT format (`LlavaQwenManagerForCausalLM` with Managers, `LlavaQwenForCausalLM`
   for the `Baseline*` folders), converted.
3. `convert_checkpoint`: original -> HF-format folder (model + processor), written to a temporary folder
   and renamed into place, so no half-written folder is ever visible. `from_pretrained` keeps these
   conversions in a cache (`LLAVA_MANAGER_CACHE`, default `$HF_HOME/llava_manager`), so a second load
   converts nothing.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ManagerError
from .convert import ConversionError, has_managers, is_original_format

HF_MODEL_TYPES = ("llava_onevision_manager", "llava_onevision")
CONFIG_FILES = ["config.json", "generation_config.json"]
SAFETENSORS_FILES = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer.model",
]
PROCESSOR_FILES = [
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
]
MARKER = "llava_manager_conversion.json"  # written last into every converted folder
STALE_TEMP_SECONDS = 24 * 3600


class HubError(ManagerError):
    """A repo, subfolder or revision that cannot be found (or reached), with what to do about it."""


# ---- 1. resolve --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint folder on local disk, and where it came from."""

    path: Path  # the folder holding config.json (subfolder applied)
    repo_id: str | None = None  # None: a local folder
    commit: str | None = None
    subfolder: str | None = None

    @property
    def description(self) -> str:
        if self.repo_id is None:
            return str(self.path)
        where = f"{self.repo_id}" + (f", subfolder {self.subfolder!r}" if self.subfolder else "")
        return f"{where} (commit {self.commit[:12] if self.commit else '?'})"


def _clean_subfolder(subfolder: str | None) -> str | None:
    if subfolder is None:
        return None
    cleaned = subfolder.replace("\\", "/").strip("/")
    if not cleaned:
        return None
    parts = cleaned.split("/")
    if any(part in ("", ".", "..") for part in parts) or os.path.isabs(subfolder):
        raise HubError(
            f"subfolder={subfolder!r} is invalid: give a folder name inside the repo, like 'Baseline + Grid'"
        )
    return cleaned


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist locally was meant as a folder."""
    return name.startswith((".", "~", "/", "\\")) or name.count("/") > 1 or "\\" in name or os.path.isabs(name)


def _folders_with_config(root: Path, depth: int = 2) -> list[str]:
    """Subfolders (up to `depth` levels down) that hold a config.json, for "did you mean" messages."""
    found = []
    for level in range(1, depth + 1):
        for config in root.glob("/".join(["*"] * level) + "/config.json"):
            relative = config.parent.relative_to(root).as_posix()
            if not relative.startswith("."):
                found.append(relative)
    return sorted(found)


def _patterns(subfolder: str | None, groups: list[list[str]]) -> list[str]:
    prefix = glob.escape(subfolder) + "/" if subfolder else ""  # fnmatch: escape [ ] * ? in folder names
    return [prefix + pattern for group in groups for pattern in group]


def allow_patterns(subfolder: str | None = None, *, pickle: bool = False) -> list[str]:
    """The files `from_pretrained` downloads from a Hub repo (relative to the repo root)."""
    groups = [CONFIG_FILES, SAFETENSORS_FILES, TOKENIZER_FILES, PROCESSOR_FILES]
    return _patterns(subfolder, groups + ([PICKLE_FILES] if pickle else []))


def resolve(
    repo_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    allow_pickle: bool = False,
) -> ResolvedSource:
    """Find the checkpoint folder on disk, downloading it from the Hub if needed.

    Raises:
        `HubError`: unknown repo / subfolder / revision, or offline with nothing cached.
    """
    subfolder = _clean_subfolder(subfolder)
    name = os.fspath(repo_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            raise HubError(f"revision={revision!r} applies to Hub repos, but {name!r} is a local folder; drop it")
        target = local / subfolder if subfolder else local
        if not target.is_dir():
            choices = _folders_with_config(local)
            raise HubError(
                f"{name!r} has no subfolder {subfolder!r}"
                + (f"; checkpoints found in: {choices}" if choices else "; it holds no checkpoint subfolders")
            )
        return ResolvedSource(path=target.resolve(), subfolder=subfolder)
    if local.exists():
        raise HubError(f"{name!r} is a file; pass the folder that holds config.json, or a Hub repo id")
    if _looks_like_path(name):
        raise HubError(
            f"local folder {name!r} does not exist; pass an existing checkpoint folder or a Hub repo id like "
            "'LooperXX/LLaVA-OV-Manager'"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise HubError(f"{name!r} is neither a local folder nor a valid Hub repo id ({error})") from None

    download = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download)
    snapshot = Path(_snapshot(name, revision, allow_patterns(subfolder), **download))
    commit = snapshot.name
    target = snapshot / subfolder if subfolder else snapshot
    listing = _repo_listing(name, commit, cache_dir)
    if not (target / "config.json").is_file():
        raise HubError(_missing_subfolder_message(name, subfolder, revision, snapshot, listing))
    if not list(target.glob("*.safetensors")):
        prefix = f"{subfolder}/" if subfolder else ""
        in_repo = [f[len(prefix) :] for f in listing or [] if f.startswith(prefix) and "/" not in f[len(prefix) :]]
        pickles = sorted({f for f in in_repo if f.endswith(".bin")} | {p.name for p in target.glob("*.bin")})
        if pickles and not allow_pickle:
            check_weights(target, pickle_names=pickles)  # raises the pickle refusal
        if allow_pickle:
            _snapshot(name, commit, _patterns(subfolder, [PICKLE_FILES]), **download)
        elif listing is None:
            raise HubError(
                f"the cached snapshot of {name!r} (commit {commit[:12]}) has no weights in {target}: the cache is "
                "incomplete (offline?). Download once with network access; if the repo has only pickle weights "
                "(*.bin), pass allow_pickle=True."
            )
    return ResolvedSource(path=target, repo_id=name, commit=commit, subfolder=subfolder)


def _repo_listing(repo_id: str, commit: str, cache_dir) -> list[str] | None:
    """Every file of the repo at `commit`, from the listing snapshot_download caches when online (else None)."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)]
    except Exception:  # not cached (never online), or an older huggingface_hub
        return None


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], **download) -> str:
    """`huggingface_hub.snapshot_download`, with its errors turned into ones that say what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    offline = constants.HF_HUB_OFFLINE
    cache = download.get("cache_dir") or constants.HF_HUB_CACHE
    if offline:  # huggingface_hub 1.x lists the Hub tree for a commit hash unless told to stay local
        download = {**download, "local_files_only": True}
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, **download)
    except GatedRepoError:
        raise HubError(
            f"{repo_id!r} is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
            "(`hf auth login`) or pass token=..."
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"revision {rev!r} does not exist in {repo_id!r}; pass a branch, tag or commit of that repo "
            "(default 'main')"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"Hub repo {repo_id!r} not found (or it is private: log in with `hf auth login` or pass token=...). "
            "The released checkpoints are 'LooperXX/LLaVA-OV-Manager'."
        ) from None
    except IncompleteSnapshotError as error:
        raise HubError(
            f"{repo_id!r} (revision {rev!r}) is only partly in the local cache {cache} and the Hub cannot be "
            f"reached: {error}. Run once with network access (unset HF_HUB_OFFLINE)."
        ) from None
    except LocalEntryNotFoundError:
        reason = (
            "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)"
            if offline or download.get("local_files_only")
            else "the Hub cannot be reached"
        )
        raise HubError(
            f"{repo_id!r} (revision {rev!r}) is not in the local cache {cache} and {reason}. Download it once "
            "with network access, or pass a local checkpoint folder."
        ) from None


def _missing_subfolder_message(repo_id, subfolder, revision, snapshot: Path, listing: list[str] | None) -> str:
    rev = revision or "main"
    where = "at the repo root" if subfolder is None else f"in subfolder {subfolder!r}"
    if listing is not None:  # the Hub's own listing
        choices = sorted({f.rsplit("/", 1)[0] for f in listing if f.endswith("/config.json")})
        return f"{repo_id!r} (revision {rev!r}) has no config.json {where}" + (
            f"; pass subfolder= one of {choices}" if choices else ""
        )
    cached = _folders_with_config(snapshot)
    return (
        f"{repo_id!r} (revision {rev!r}) has no config.json {where} in its cached snapshot"
        + (f"; subfolders with a checkpoint: {cached}" if cached else "")
        + ". Check the name (spaces and '+' included, e.g. 'Baseline + Grid + Manager'); offline, only cached "
        "files are seen."
    )


# ---- 2. detect ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFormat:
    kind: str  # "hf" (loads directly) or "original" (needs conversion)
    managers: bool
    config: dict

    @property
    def description(self) -> str:
        if self.kind == "hf":
            return f"HF format ({self.config.get('model_type')}{', with Managers' if self.managers else ''})"
        return "original LLaVA-OV format" + (" with Managers" if self.managers else " without Managers (Baseline)")


def read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        inside = _folders_with_config(Path(path)) if Path(path).is_dir() else []
        hint = f"; checkpoints are in its subfolders {inside}: pass subfolder=" if inside else ""
        raise ConversionError(f"{path} has no config.json, so it is not a checkpoint folder{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}); the download may be corrupt") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file} does not hold a JSON object")
    return config


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """Which format a checkpoint folder is in. Raises `ConversionError` for anything else."""
    config = read_config(Path(path))
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return CheckpointFormat("hf", managers=config.get("manager") is not None, config=config)
    if is_original_format(config):
        return CheckpointFormat("original", managers=has_managers(config), config=config)
    raise ConversionError(
        f"{path} is neither an original LLaVA-OV(-Manager) checkpoint (architectures LlavaQwenManagerForCausalLM "
        "or LlavaQwenForCausalLM, with mm_* fields) nor a converted one (model_type 'llava_onevision_manager' or "
        f"'llava_onevision'); its config.json says model_type={model_type!r}, "
        f"architectures={config.get('architectures')!r}"
    )


def check_weights(
    path: Path, *, allow_pickle: bool = False, pickle_names: list[str] | None = None
) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files to use). Reads only headers: missing, truncated and corrupt files raise.

    `pickle_names`: pickle files known to be in the (remote) folder though not on disk.
    """
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a valid safetensors index ({error!r})") from None
        safetensors = [path / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in safetensors if not p.is_file()]
        if missing:
            raise ConversionError(f"{index} lists shards that are missing from {path}: {missing[:3]}; download again")
    else:
        safetensors = sorted(path.glob("*.safetensors"))
    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:
            raise ConversionError(
                f"{file} is not a readable safetensors file, probably truncated or corrupt ({error}); delete it and "
                "download it again"
            ) from None
    if safetensors:
        return safetensors, []
    pickles = sorted(path.glob("pytorch_model*.bin")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    names = pickle_names or [p.name for p in pickles]
    if names and not allow_pickle:
        raise ConversionError(
            f"{path} has only pickle weights ({', '.join(names[:3])}). Pickle files can run code "
            "when loaded, so they are refused. Convert them to safetensors, or opt in with allow_pickle=True "
            "(`--allow-pickle`): they are then read with torch.load(weights_only=True)."
        )
    if not pickles:
        raise ConversionError(f"{path} has no weights (model.safetensors, sharded *.safetensors, or pytorch_model.bin)")
    return [], pickles


def read_pickle_weights(files: list[Path]) -> dict:
    """Opt-in pickle loading, restricted to tensors (`torch.load(weights_only=True)`)."""
    import torch

    state = {}
    for file in files:
        try:
            loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise ConversionError(f"{file} could not be read with torch.load(weights_only=True): {error}") from None
        if not isinstance(loaded, dict):
            raise ConversionError(f"{file} does not hold a state dict (got {type(loaded).__name__})")
        state.update(loaded)
    return state


# ---- 3. convert ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = False):
    """Yield a fresh temporary folder next to `final`; on success rename it to `final`, on failure delete it.

    If `final` appeared meanwhile (another process converted the same checkpoint), the new copy is dropped
    and the existing one kept, unless `replace`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield temporary
        _apply_umask(temporary)  # mkdtemp (and some writers) use owner-only modes
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(temporary, final)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale_temporaries(final: Path) -> None:
    """Temporaries left by a killed process (never visible as an entry) are removed after a day."""
    leftovers = [
        *final.parent.glob(f".{glob.escape(final.name)}.tmp-*"),
        *final.parent.glob(f".{glob.escape(final.name)}.old-*"),
    ]
    for leftover in leftovers:
        with contextlib.suppress(OSError):
            if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


class _Progress:
    """A byte-weighted progress bar over the conversion steps (tqdm on stderr; off when not a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool | None):
        from tqdm.auto import tqdm

        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not enabled, desc="converting")

    def step(self, description: str, nbytes: int = 0) -> None:
        self.bar.set_description_str(description)
        if nbytes:
            self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def convert_checkpoint(
    source: ResolvedSource | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert an original-format checkpoint folder into an HF-format folder (model + processor).

    `out_dir` appears only when everything was written (temporary folder + rename); on any error nothing is left.

    Args:
        source (`ResolvedSource` or path): the original checkpoint folder (see `resolve`).
        out_dir (path): where the HF-format folder goes; must not exist unless `overwrite`.
        tokenizer (`PreTrainedTokenizerBase` or path, *optional*): defaults to the tokenizer files beside the weights.
        allow_pickle (`bool`, *optional*, defaults to `False`): accept `*.bin` weights (read with `weights_only=True`).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `out_dir` (atomically).
        progress (`bool`, *optional*): show a progress bar (default: when stderr is a terminal).

    Returns:
        `Path`: `out_dir`.
    """
    source = source if isinstance(source, ResolvedSource) else ResolvedSource(path=Path(source).resolve())
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ManagerError(f"{out_dir} already exists and is not empty; choose a new folder or pass overwrite=True")
    checkpoint = detect_format(source.path)
    if checkpoint.kind != "original":
        raise ConversionError(f"{source.description} is already in {checkpoint.description}: nothing to convert")
    safetensors, pickles = check_weights(source.path, allow_pickle=allow_pickle)
    weight_bytes = sum(p.stat().st_size for p in safetensors + pickles)
    bar = _Progress(2 * weight_bytes + 1, progress)
    try:
        with atomic_directory(out_dir, replace=overwrite) as temporary:
            _convert_into(
                source, checkpoint, pickles, temporary, tokenizer=tokenizer, bar=bar, weight_bytes=weight_bytes
            )
    finally:
        bar.close()
    return out_dir


def _convert_into(source, checkpoint, pickles, out: Path, *, tokenizer, bar: _Progress, weight_bytes: int) -> None:
    import transformers

    from .version import __version__
    from .convert import load_original
    from .processor import build_processor, crop_mode_for, prepare_tokenizer

    crop_mode = crop_mode_for(checkpoint.config)
    bar.step("reading the tokenizer")
    tokenizer = prepare_tokenizer(tokenizer if tokenizer is not None else source.path, checkpoint.config)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<video>", "<|im_start|>")}
    bar.step(f"reading and converting {_size(weight_bytes)} of weights")
    state_dict = read_pickle_weights(pickles) if pickles else None
    model = load_original(
        source.path,
        image_token_id=ids["<image>"],
        video_token_id=ids["<video>"],
        im_start_token_id=ids["<|im_start|>"] if ids["<|im_start|>"] != tokenizer.unk_token_id else None,
        dtype="auto",
        state_dict=state_dict,
    )
    del state_dict
    bar.step("writing the model", weight_bytes)
    processor = build_processor(model.config, tokenizer, crop_mode=crop_mode)
    _set_generation_config(model, source.path, tokenizer)
    model.save_pretrained(out)
    bar.step("writing the processor", weight_bytes)
    processor.save_pretrained(out)
    marker = {
        "source": source.repo_id or str(source.path),
        "subfolder": source.subfolder,
        "commit": source.commit,
        "format": checkpoint.description,
        "llava_manager_version": __version__,
        "transformers_version": transformers.__version__,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    bar.step("done", 1)


def _set_generation_config(model, checkpoint_dir: Path, tokenizer) -> None:
    """The checkpoint's generation_config.json (stop at <|im_end|>), with the tokenizer's pad token."""
    from transformers import GenerationConfig

    if (checkpoint_dir / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(checkpoint_dir)
        except Exception as error:
            raise ConversionError(f"{checkpoint_dir / 'generation_config.json'} cannot be read: {error}") from None
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()]
    if model.generation_config.eos_token_id is None and eos:
        model.generation_config.eos_token_id = eos[0]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"


# ---- the cache of converted checkpoints ----------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$LLAVA_MANAGER_CACHE`, else `$HF_HOME/llava_manager` (`~/.cache/huggingface/llava_manager`)."""
    from huggingface_hub import constants

    return Path(os.environ.get("LLAVA_MANAGER_CACHE") or Path(constants.HF_HOME) / "llava_manager").expanduser()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._") or "root"
    return f"{keep[:60]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cache_entry(source: ResolvedSource, root: Path, variant: str = "") -> Path:
    """Where the conversion of `source` is kept. Hub: repo/commit/subfolder. Local: path + file fingerprint.

    `variant` distinguishes conversions of the same source with other settings (e.g. another tokenizer).
    """
    from .version import __version__

    base = Path(root) / f"v{__version__}"
    if source.repo_id is not None:
        name = _slug((source.subfolder or "") + (f"\n{variant}" if variant else ""))
        return base / "hub" / source.repo_id.replace("/", "--") / source.commit / name
    fingerprint = hashlib.sha256(f"{source.path.resolve()}\n{variant}".encode())
    for file in sorted(source.path.iterdir()):
        if file.is_file():
            stat = file.stat()
            fingerprint.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return base / "local" / f"{_slug(source.path.name)}-{fingerprint.hexdigest()[:16]}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _tokenizer_variant(tokenizer) -> str:
    if tokenizer is None:
        return ""
    if isinstance(tokenizer, (str, os.PathLike)):
        local = Path(tokenizer).expanduser()
        return f"tokenizer={local.resolve() if local.exists() else tokenizer}"
    vocab = sorted(tokenizer.get_vocab().items())
    return f"tokenizer={type(tokenizer).__name__}:{hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]}"


# ---- from_pretrained ---------------------------------------------------------------------------------------


def from_pretrained(
    repo_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    allow_pickle: bool = False,
    tokenizer=None,
    conversion_cache_dir: str | os.PathLike | None = None,
    force_conversion: bool = False,
    progress: bool | None = None,
    **hf_kwargs,
):
    """Load a LLaVA-OV(-Manager) checkpoint, converting it first if it is in the original format.

    Args:
        repo_or_path (`str` or `os.PathLike`): a Hub repo id (`"LooperXX/LLaVA-OV-Manager"`) or a local folder.
        subfolder (`str`, *optional*): e.g. `"Baseline + Grid + Manager"`, `"Baseline + Manager"`, `"Baseline + Grid"`,
            `"Baseline"`.
        revision (`str`, *optional*): branch, tag or commit of a Hub repo (defaults to `"main"`).
        cache_dir (`str`, *optional*): the Hugging Face download cache (defaults to huggingface_hub's).
        token (`str` or `bool`, *optional*): Hub token for private or gated repos.
        local_files_only (`bool`, *optional*, defaults to `False`): never touch the network (as `HF_HUB_OFFLINE=1`).
        force_download (`bool`, *optional*, defaults to `False`): download again even if cached.
        allow_pickle (`bool`, *optional*, defaults to `False`): accept pickle-only (`*.bin`) weights, read with
            `torch.load(weights_only=True)`. Refused by default: pickle can run code.
        tokenizer (*optional*): a tokenizer or tokenizer folder, for checkpoints without tokenizer files.
        conversion_cache_dir (`str`, *optional*): where converted checkpoints are kept (defaults to
            `$LLAVA_MANAGER_CACHE` or `$HF_HOME/llava_manager`).
        force_conversion (`bool`, *optional*, defaults to `False`): convert again even if a converted copy is cached.
        progress (`bool`, *optional*): progress bar while converting (default: when stderr is a terminal).
        hf_kwargs: passed to `AutoModelForImageTextToText.from_pretrained` (`dtype`, `device_map`,
            `attn_implementation`, ...).

    Returns:
        `(model, processor)`: for original-format checkpoints, a `LlavaOnevisionManagerForConditionalGeneration` in eval
        mode (Managers as released, or none for the `Baseline*` checkpoints; the original image layout) and its
        `LlavaOnevisionManagerProcessor`. HF-format folders load as saved (a plain `llava_onevision` one stays plain).

    Raises:
        `HubError`: the repo / subfolder / revision cannot be found, or is not cached while offline.
        `ConversionError`: a folder that is neither format, missing / truncated / corrupt weights, shapes that
            disagree with the config (naming the first bad key), or pickle weights without `allow_pickle=True`.

    Example:

    ```python
    >>> import llava_manager
    >>> model, processor = llava_manager.from_pretrained(
    ...     "LooperXX/LLaVA-OV-Manager", subfolder="Baseline + Grid + Manager"
    ... )
    >>> conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    >>> prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> answer = processor.decode(model.generate(**inputs, max_new_tokens=32)[0, inputs["input_ids"].shape[1]:])
    ```
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import processor as _registers_processor_classes  # noqa: F401

    source = resolve(
        repo_or_path,
        subfolder,
        revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
        allow_pickle=allow_pickle,
    )
    checkpoint = detect_format(source.path)
    if checkpoint.kind == "hf":
        _, pickles = check_weights(source.path, allow_pickle=allow_pickle)
        if pickles:
            hf_kwargs.setdefault("use_safetensors", False)
        folder = source.path
    else:
        root = Path(conversion_cache_dir) if conversion_cache_dir else default_cache_dir()
        folder = cache_entry(source, root, variant=_tokenizer_variant(tokenizer))
        if force_conversion or not is_converted(folder):
            convert_checkpoint(
                source, folder, tokenizer=tokenizer, allow_pickle=allow_pickle, overwrite=True, progress=progress
            )
    from transformers import ProcessorMixin

    model = AutoModelForImageTextToText.from_pretrained(folder, **hf_kwargs)
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        processor = error
    if not isinstance(processor, ProcessorMixin):  # AutoProcessor falls back to a bare tokenizer
        raise ConversionError(
            f"{folder} holds a model but no processor (processor_config.json with tokenizer files; got "
            f"{type(processor).__name__}). Save the model's processor there with processor.save_pretrained()."
        )
    return model.eval(), processor
