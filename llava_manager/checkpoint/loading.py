"""`llava_manager.from_pretrained`: any LLaVA-OV(-Manager) checkpoint, local or on the Hub, in one call.

Three steps: `resolve` (source.py) finds or downloads the folder; `detect_format` (formats.py) tells our HF format
from the original LLaVA-NeXT one; an original checkpoint is converted once (conversion.py) into the conversion
cache (cache.py), so a second load converts nothing. Then transformers' Auto classes load the HF-format folder.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ConversionError
from ..extras import require_extra
from . import conversion, managers_only
from .cache import cache_entry, default_cache_dir, is_converted, tokenizer_variant
from .formats import detect_format
from .source import resolve
from .weights import check_weights
from .zero3_shards import shard_by_shard


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
    base_model: str | os.PathLike | None = None,
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
        base_model (`str` or `os.PathLike`, *optional*): when `repo_or_path` holds Managers only (`save_managers`),
            the base model to put them on (any format this function loads; `subfolder` and `revision` then apply to
            the Managers). Defaults to the base recorded in the Managers' `manager_config.json`.
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
    require_extra("vision", "loading a checkpoint's processor (transformers' LLaVA-OV video processor)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import processor as _registers_processor_classes  # noqa: F401

    if base_model is not None or managers_only.is_managers_folder(repo_or_path):
        return _with_managers_only(
            repo_or_path,
            base_model,
            subfolder=subfolder,
            revision=revision,
            hub={"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only},
            base_kwargs=dict(
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
                allow_pickle=allow_pickle,
                tokenizer=tokenizer,
                conversion_cache_dir=conversion_cache_dir,
                force_conversion=force_conversion,
                progress=progress,
                **hf_kwargs,
            ),
        )
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
        folder = cache_entry(source, root, variant=tokenizer_variant(tokenizer))
        with _local_main_process_first(), _without_zero3_init():
            if force_conversion or not is_converted(folder):
                conversion.convert_checkpoint(
                    source, folder, tokenizer=tokenizer, allow_pickle=allow_pickle, overwrite=True, progress=progress
                )
    from transformers import ProcessorMixin

    with shard_by_shard():  # under ZeRO-3: one shard mapped at a time, not the whole checkpoint
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


@contextlib.contextmanager
def _local_main_process_first():
    """In a distributed run, the first process of each machine converts (into the machine's cache) while the others
    wait, then find the conversion there: one whole model in memory per machine, not one per process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()


@contextlib.contextmanager
def _without_zero3_init():
    """Convert with whole tensors even while a ZeRO-3 run's DeepSpeed config is active (transformers would build the
    conversion's model under deepspeed.zero.Init, with empty shards where the weights go)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def _with_managers_only(managers, base_model, *, subfolder, revision, hub: dict, base_kwargs: dict):
    """A base model (loaded like any checkpoint) with a Managers-only folder or Hub repo on it."""
    from ..config import ImageLayout
    from .assembly import build_processor

    if subfolder is not None:
        if not Path(os.fspath(managers)).is_dir():
            raise ConversionError(
                "subfolder= works for a local Managers-only folder only; put the files at the Hub repo's root"
            )
        managers = Path(os.fspath(managers)) / subfolder
    folder = managers_only.resolve_managers(managers, revision=revision, **hub)
    saved = managers_only.read_manager_config(folder)
    if base_model is None:
        base_model = saved.get("base_model", {}).get("name_or_path")
        if not base_model:
            raise ConversionError(
                f"{folder} holds Managers only and records no base model; pass base_model='<LLaVA-OV checkpoint "
                "or Hub id>' (the model they were trained on)"
            )
    model, processor = from_pretrained(base_model, **base_kwargs)
    managers_only.load_managers(model, folder)
    layout = ImageLayout.from_dict(model.config.image_layout)
    if not layout.is_default:  # the base's processor counts image tokens for its own layout
        processor = build_processor(model.config, processor.tokenizer)
    return model.eval(), processor
