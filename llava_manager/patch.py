"""`patch_llava` / `unpatch_llava`: add Managers to a live LLaVA-OV model, and take them away again.

Everything is checked before anything changes. Patching then, on the model's `LlavaOnevisionModel`
(`model.model`, or the model itself when bare), (1) attaches one registered submodule, `manager`,
holding every new parameter; (2) replaces `get_image_features` on that instance (features.py);
(3) installs the LLM hooks (injection.py); (4) switches the config to `LlavaOnevisionManagerConfig` and
the classes to the registered subclasses (modeling.py), so save/load round-trips and transformers
initialises the Managers. A step that fails undoes the earlier ones; `unpatch_llava` undoes them all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionModel, PreTrainedModel

from .config import ImageLayout, ManagerConfig, ManagerError
from .features import ImageFeatureComputer
from .forward_state import ForwardScope
from .injection import LLMInjection, ProjectorIdleRun
from .managers import ManagerStack
from .modeling import MANAGER_CLASS_OF, LlavaOnevisionManagerConfig

_RECORD = "_llava_manager_patch"  # attribute of the patched LlavaOnevisionModel


@dataclass
class _PatchRecord:
    manager_config: ManagerConfig | None
    layout: ImageLayout
    features: ImageFeatureComputer
    injection: LLMInjection | ProjectorIdleRun | None
    scope: ForwardScope | None
    original_config: object | None = None

    def remove_hooks(self) -> None:
        for part in (self.injection, self.features, self.scope):
            if part is not None:
                part.remove()


def llava_model_of(model) -> LlavaOnevisionModel | None:
    """The `LlavaOnevisionModel` that carries the Managers: `model` itself (bare, what `AutoModel` gives) or its
    `.model` (the ForConditionalGeneration class, its subclasses, any head that holds one as `.model`); else None."""
    if isinstance(model, LlavaOnevisionModel):
        return model
    inner = model.__dict__.get("_modules", {}).get("model") if isinstance(model, torch.nn.Module) else None
    return inner if isinstance(inner, LlavaOnevisionModel) else None


def is_patched(model) -> bool:
    """True when `model` carries llava-manager's Managers / image layout."""
    llava = llava_model_of(model)
    return llava is not None and getattr(llava, _RECORD, None) is not None


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
    record = _attach(model, resolved, layout)  # on failure it has undone its own steps
    record.original_config = original_config
    _swap_config(model, original_config, new_config)
    _swap_classes(model, to_managers=True)
    return model


def attach_from_config(model) -> None:
    """Attach Managers described by `model.config` (used when a saved patched model is built or loaded)."""
    manager = getattr(model.config, "manager", None)
    resolved = ManagerConfig.from_dict(manager).resolve(model.config) if manager is not None else None
    layout = ImageLayout.from_dict(getattr(model.config, "image_layout", None))
    _attach(model, resolved, layout)
    _swap_classes(model, to_managers=True)


def _attach(model, config: ManagerConfig | None, layout: ImageLayout) -> _PatchRecord:
    """Attach the ManagerStack, the feature computer and the hooks; if any step fails, undo the others and raise."""
    llava = llava_model_of(model)
    scope = features = injection = None
    try:
        stack = None
        if config is not None:
            width = (
                model.config.vision_config.hidden_size
                if config.injection == "projector"
                else model.config.text_config.hidden_size
            )
            stack = _build_stack(config, width, reference=llava.multi_modal_projector.linear_1.weight)
            stack.train(llava.training)  # a new module starts in training mode; follow the model's
            llava.manager = stack
        if config is not None:
            scope = ForwardScope(llava)
        features = ImageFeatureComputer(llava, stack, config, layout, scope)
        llava.get_image_features = features
        if config is not None:
            injection = (LLMInjection if config.injection == "llm" else ProjectorIdleRun)(llava, stack, scope)
    except BaseException:
        for part in (injection, features, scope):
            if part is not None:
                part.remove()
        _drop_modules(llava)
        raise
    record = _PatchRecord(manager_config=config, layout=layout, features=features, injection=injection, scope=scope)
    object.__setattr__(llava, _RECORD, record)
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


def _drop_modules(llava) -> None:
    llava.__dict__.pop("get_image_features", None)
    if "manager" in llava._modules:
        del llava._modules["manager"]


def _swap_config(model, old, new) -> None:
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def _swap_classes(model, *, to_managers: bool) -> None:
    """transformers' LLaVA-OV classes <-> their registered Manager subclasses, for `model` and its
    LlavaOnevisionModel (other subclasses keep their class)."""
    mapping = MANAGER_CLASS_OF if to_managers else {v: k for k, v in MANAGER_CLASS_OF.items()}
    for module in {id(m): m for m in (model, llava_model_of(model))}.values():
        if type(module) in mapping:
            module.__class__ = mapping[type(module)]


def unpatch_llava(model):
    """Remove everything `patch_llava` added and return the model, which then behaves as before patching.

    Trained Manager weights are dropped; save the model first if you need them.
    """
    llava = llava_model_of(model)
    record = getattr(llava, _RECORD, None) if llava is not None else None
    if record is None:
        raise ManagerError("this model is not patched by llava-manager; nothing to unpatch.")
    original_config = record.original_config
    if original_config is None:
        # built or loaded as a Manager class: go back to a plain LLaVA-OV config
        original_config = copy.copy(model.config)
        original_config.__class__ = LlavaOnevisionConfig
        for name in ("manager", "image_layout", "model_type"):
            original_config.__dict__.pop(name, None)
    record.remove_hooks()
    object.__delattr__(llava, _RECORD)
    _drop_modules(llava)
    _swap_config(model, model.config, original_config)
    _swap_classes(model, to_managers=False)
    return model


def patch_record(model) -> _PatchRecord:
    llava = llava_model_of(model)
    record = getattr(llava, _RECORD, None) if llava is not None else None
    if record is None:
        raise ManagerError("this model is not patched by llava-manager")
    return record
