"""Where a checkpoint is: a local folder, or a Hub repo fetched through `huggingface_hub`.

`resolve` takes a folder or a repo id (with `subfolder`, `revision`, its cache, offline mode, subfolders with spaces
and `+`) and downloads only what loading needs (config, safetensors, tokenizer and processor files; pickle weights
only on explicit opt-in). Every failure says what to do (`HubError`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError
from .files import (
    CONFIG_FILES,
    PICKLE_FILES,
    PROCESSOR_FILES,
    SAFETENSORS_FILES,
    TOKENIZER_FILES,
    folders_with_config,
)
from .weights import check_weights


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


def looks_like_path(name: str) -> bool:
    """Whether `name`, which does not exist locally, was meant as a folder: Hub ids are `name` or `owner/name`
    (a trailing slash allowed), anything else is a path. The one test of "Hub id or path"."""
    name = os.fspath(name)
    return (
        name.startswith((".", "~", "/", "\\"))
        or name.rstrip("/").count("/") > 1
        or "\\" in name
        or os.path.isabs(name)
    )


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
            choices = folders_with_config(local)
            raise HubError(
                f"{name!r} has no subfolder {subfolder!r}"
                + (f"; checkpoints found in: {choices}" if choices else "; it holds no checkpoint subfolders")
            )
        return ResolvedSource(path=target.resolve(), subfolder=subfolder)
    if local.exists():
        raise HubError(f"{name!r} is a file; pass the folder that holds config.json, or a Hub repo id")
    if looks_like_path(name):
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
    try:
        snapshot = Path(_snapshot(name, revision, allow_patterns(subfolder), **download))
    except HubError as error:  # "owner/name" may also be a mistyped relative folder: say both
        raise HubError(f"no local folder {name!r} in {Path.cwd()}, and as a Hub repo id: {error}") from None
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
    cached = folders_with_config(snapshot)
    return (
        f"{repo_id!r} (revision {rev!r}) has no config.json {where} in its cached snapshot"
        + (f"; subfolders with a checkpoint: {cached}" if cached else "")
        + ". Check the name (spaces and '+' included, e.g. 'Baseline + Grid + Manager'); offline, only cached "
        "files are seen."
    )
