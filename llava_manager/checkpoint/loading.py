"""`llava_manager.from_pretrained`: any LLaVA-OV(-Manager) checkpoint, local or on the Hub, in one call.

Three steps: `resolve` (source.py) finds or downloads the folder; `detect_format` (formats.py) tells our HF format
from the original LLaVA-NeXT one; an original checkpoint is converted once (conversion.py) into the conversion
cache (cache.py), so a second load converts nothing. Then transformers' Auto classes load the HF-format folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConversionError
from ..extras import require_extra
from . import conversion
from .cache import cache_entry, default_cache_dir, is_converted, tokenizer_variant
from .formats import detect_format
from .source import resolve
from .weights import check_weights


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
    require_extra("vision", "loading a checkpoint's processor (transformers' LLaVA-OV video processor)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import processor as _registers_processor_classes  # noqa: F401

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
        if force_conversion or not is_converted(folder):
            conversion.convert_checkpoint(
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
