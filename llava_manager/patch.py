"""`patch_llava` / `unpatch_llava`: add Managers to a live LLaVA-OV model, and take them away again.

Everything is checked before anything changes. Patching then (1) attaches one registered submodule,
`model.model.manager`, holding every new parameter; (2) replaces `get_image_features` on that model
instance (features.py); (3) installs the LLM hooks (injection.py); (4) switches the model's config to
`LlavaOnevisionManagerConfig` and its class to the registered subclass, so save/load round-trips.
`unpatch_llava` undoes each step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from .config import ImageLayout, ManagerConfig, ManagerError
from .features import ImageFeatureComputer
from .injection import LLMInjection, ProjectorIdleRun
from .managers import ManagerStack
from .modeling import LlavaOnevisionManagerConfig, LlavaOnevisionManagerForConditionalGeneration

_RECORD = "_llava_manager_patch"


@dataclass
class _PatchRecord:
    manager_config: ManagerConfig | None
    layout: ImageLayout
    features: ImageFeatureComputer
    injection: LLMInjection | ProjectorIdleRun | None
    original_config: object | None = None
    original_class: type | None = None

    def remove_hooks(self) -> None:
        if self.injection is not None:
            self.injection.remove()
        self.features.remove()


def is_patched(model) -> bool:
    """True when `model` carries llava-manager's Managers / image layout."""
    return getattr(model, _RECORD, None) is not None


def _check_model(model) -> None:
    if not isinstance(model, LlavaOnevisionForConditionalGeneration):
        hint = ""
        if type(model).__name__.startswith("Peft"):
            hint = " Patch the base model first, then wrap it with PEFT."
        raise ManagerError(
            f"patch_llava needs a transformers LlavaOnevisionForConditionalGeneration, got {type(model).__name__}.{hint}"
        )
    if is_patched(model):
        raise ManagerError("this model is already patched; call unpatch_llava(model) first to change its Managers.")


def patch_llava(
    model: LlavaOnevisionForConditionalGeneration,
    config: ManagerConfig | None = None,
    *,
    layout: ImageLayout | None = None,
    managers: bool = True,
) -> LlavaOnevisionForConditionalGeneration:
    """Add Managers to a LLaVA-OneVision model (in place) and return it.

    Args:
        model (`LlavaOnevisionForConditionalGeneration`): a transformers LLaVA-OV model.
        config (`ManagerConfig`, *optional*): the Managers; defaults to the paper's setting.
        layout (`ImageLayout`, *optional*): image-token layout; defaults to transformers' (anyres, rounding unpad).
        managers (`bool`, *optional*, defaults to `True`): `False` applies only `layout` (no Managers), as for the
            released `Baseline` checkpoints; `config` must then be None.

    Returns:
        The same model object, now a `LlavaOnevisionManagerForConditionalGeneration`. A freshly patched model
        computes exactly what it computed before (the Managers are zero-initialised).

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
    original_class = type(model)
    try:
        record = _attach(model, resolved, layout)
    except Exception:
        _detach_modules(model)
        raise
    record.original_config, record.original_class = original_config, original_class
    for module in model.modules():
        if getattr(module, "config", None) is original_config:
            module.config = new_config
    if original_class is LlavaOnevisionForConditionalGeneration:
        model.__class__ = LlavaOnevisionManagerForConditionalGeneration
    return model


def attach_from_config(model) -> None:
    """Attach Managers described by `model.config` (used when a saved patched model is loaded)."""
    manager = getattr(model.config, "manager", None)
    resolved = ManagerConfig.from_dict(manager).resolve(model.config) if manager is not None else None
    layout = ImageLayout.from_dict(getattr(model.config, "image_layout", None))
    _attach(model, resolved, layout)


def _attach(model, config: ManagerConfig | None, layout: ImageLayout) -> _PatchRecord:
    llava = model.model
    stack = None
    if config is not None:
        width = (
            model.config.vision_config.hidden_size if config.injection == "projector" else model.config.text_config.hidden_size
        )
        stack = _build_stack(config, width, reference=llava.multi_modal_projector.linear_1.weight)
        stack.train(model.training)  # a new module starts in training mode; follow the model's
        llava.manager = stack
    features = ImageFeatureComputer(llava, stack, config, layout)
    llava.get_image_features = features
    injection = None
    if config is not None:
        injection = (LLMInjection if config.injection == "llm" else ProjectorIdleRun)(llava, stack, features)
    record = _PatchRecord(manager_config=config, layout=layout, features=features, injection=injection)
    object.__setattr__(model, _RECORD, record)
    return record


def _build_stack(config: ManagerConfig, width: int, reference: torch.Tensor) -> ManagerStack:
    """Create the ManagerStack like the model's own weights: same device and dtype, ZeRO-3-partitioned if active."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    device = reference.device
    if is_deepspeed_zero3_enabled() and hasattr(reference, "ds_id"):  # the model is ZeRO-3-partitioned
        import deepspeed
        from transformers.integrations.deepspeed import deepspeed_config

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
            return ManagerStack(config, width)
    if device.type == "meta":
        with torch.device("meta"):
            return ManagerStack(config, width).to(reference.dtype)
    return ManagerStack(config, width).to(device=device, dtype=reference.dtype)


def _detach_modules(model) -> None:
    record = getattr(model, _RECORD, None)
    if record is not None:
        record.remove_hooks()
        object.__delattr__(model, _RECORD)
    llava = model.model
    llava.__dict__.pop("get_image_features", None)
    if "manager" in llava._modules:
        del llava._modules["manager"]


def unpatch_llava(model):
    """Remove everything `patch_llava` added and return the model, which then behaves as before patching.

    Trained Manager weights are dropped; save the model first if you need them.
    """
    record = getattr(model, _RECORD, None)
    if record is None:
        raise ManagerError("this model is not patched by llava-manager; nothing to unpatch.")
    if record.original_config is None:
        # loaded as a LlavaOnevisionManagerForConditionalGeneration: go back to a plain LLaVA-OV config/class
        base_config = copy.copy(model.config)
        base_config.__class__ = LlavaOnevisionManagerConfig.__mro__[1]
        for name in ("manager", "image_layout", "model_type"):
            base_config.__dict__.pop(name, None)
        record.original_config, record.original_class = base_config, LlavaOnevisionForConditionalGeneration
    current_config = model.config
    _detach_modules(model)
    for module in model.modules():
        if getattr(module, "config", None) is current_config:
            module.config = record.original_config
    model.__class__ = record.original_class
    return model


def patch_record(model) -> _PatchRecord:
    record = getattr(model, _RECORD, None)
    if record is None:
        raise ManagerError("this model is not patched by llava-manager")
    return record
