"""`patch_llava` / `unpatch_llava`: add Managers to a live LLaVA-OV model, and take them away again.

Everything is checked before anything changes. Patching then attaches the pieces (attach.py: the `manager`
submodule, `get_image_features`, the hooks, on the model's `LlavaOnevisionModel`), switches the config to
`LlavaOnevisionManagerConfig` and the classes to the registered subclasses (modeling.py), so save/load round-trips
and transformers initialises the Managers. A step that fails undoes the earlier ones; `unpatch_llava` undoes them all.
"""

from __future__ import annotations

import copy

from transformers import LlavaOnevisionConfig, PreTrainedModel

from .attach import attach, detach, is_patched, llava_model_of, patch_record
from .config import ImageLayout, ManagerConfig
from .errors import ManagerError
from .modeling import LlavaOnevisionManagerConfig, use_manager_classes

__all__ = ["is_patched", "patch_llava", "patch_record", "unpatch_llava"]


def _check_model(model) -> None:
    if llava_model_of(model) is None:
        hint = ""
        if type(model).__name__.startswith("Peft"):
            hint = " Patch the base model first, then wrap it with PEFT."
        raise ManagerError(
            "patch_llava needs a transformers LLaVA-OneVision model (LlavaOnevisionForConditionalGeneration, "
            f"LlavaOnevisionModel, or a model holding one as `.model`), got {type(model).__name__}.{hint}"
        )
    if is_patched(model):
        raise ManagerError("this model is already patched; call unpatch_llava(model) first to change its Managers.")


def patch_llava(
    model: PreTrainedModel,
    config: ManagerConfig | None = None,
    *,
    layout: ImageLayout | None = None,
    managers: bool = True,
) -> PreTrainedModel:
    """Add Managers to a LLaVA-OneVision model (in place) and return it.

    Args:
        model (`PreTrainedModel`): a transformers `LlavaOnevisionForConditionalGeneration` (or a subclass), a bare
            `LlavaOnevisionModel` (what `AutoModel` loads), or any model holding a `LlavaOnevisionModel` as `.model`.
        config (`ManagerConfig`, *optional*): the Managers; defaults to the paper's setting.
        layout (`ImageLayout`, *optional*): image-token layout; defaults to transformers' (anyres, rounding unpad).
        managers (`bool`, *optional*, defaults to `True`): `False` applies only `layout` (no Managers), as for the
            released `Baseline` checkpoints; `config` must then be None.

    Returns:
        The same model object. A `LlavaOnevisionForConditionalGeneration` becomes a
        `LlavaOnevisionManagerForConditionalGeneration` and a `LlavaOnevisionModel` a `LlavaOnevisionManagerModel`
        (subclasses keep their class). A freshly patched model computes exactly what it computed before (the Managers
        are zero-initialised).

    Raises:
        `ManagerError` (a `ValueError`): the model is not LLaVA-OV, is already patched, or the config does not fit
        it. Nothing is changed on the model in that case.

    Example:

    ```python
    >>> from llava_manager import ManagerConfig, patch_llava
    >>> model = patch_llava(model, ManagerConfig(manager_type="static", grid="all"))
    ```
    """
    if not managers:
        if config is not None:
            raise ManagerError("patch_llava(managers=False) applies only the image layout; pass config=None")
        return _patch(model, None, layout or ImageLayout())
    return _patch(model, config if config is not None else ManagerConfig(), layout or ImageLayout())


def _patch(model, config: ManagerConfig | None, layout: ImageLayout):
    _check_model(model)
    if not isinstance(layout, ImageLayout):
        raise ManagerError(f"layout must be an ImageLayout, got {type(layout).__name__}")
    if config is not None and not isinstance(config, ManagerConfig):
        raise ManagerError(f"config must be a ManagerConfig, got {type(config).__name__}")
    resolved = config.resolve(model.config, layout) if config is not None else None
    # --- every check passed: now change the model ---
    original_config = model.config
    new_config = copy.copy(original_config)
    new_config.__class__ = LlavaOnevisionManagerConfig
    new_config.__dict__.pop("model_type", None)  # a config read from disk stores its model_type per instance
    new_config.manager = resolved.to_dict() if resolved is not None else None
    new_config.image_layout = layout.to_dict()
    record = attach(model, resolved, layout)  # on failure it has undone its own steps
    record.original_config = original_config
    _swap_config(model, original_config, new_config)
    use_manager_classes(model)
    return model


def _swap_config(model, old, new) -> None:
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def unpatch_llava(model):
    """Remove everything `patch_llava` added and return the model, which then behaves as before patching.

    Trained Manager weights are dropped; save the model first if you need them.
    """
    if not is_patched(model):
        raise ManagerError("this model is not patched by llava-manager; nothing to unpatch.")
    record = patch_record(model)
    original_config = record.original_config
    if original_config is None:
        # built or loaded as a Manager class: go back to a plain LLaVA-OV config
        original_config = copy.copy(model.config)
        original_config.__class__ = LlavaOnevisionConfig
        for name in ("manager", "image_layout", "model_type"):
            original_config.__dict__.pop(name, None)
    detach(model)
    _swap_config(model, model.config, original_config)
    use_manager_classes(model, managers=False)
    return model
