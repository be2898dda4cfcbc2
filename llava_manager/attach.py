"""Attaching the Managers' pieces to a `LlavaOnevisionModel`, and taking them off again.

The layer below `patch.py` (the public `patch_llava` / `unpatch_llava`, which also swap config and classes) and
`modeling.py` (whose registered classes attach from their config when built). On the model's `LlavaOnevisionModel`
(`model.model`, or the model itself when bare) `attach` adds one registered submodule, `manager`, holding every new
parameter, replaces `get_image_features` and `get_video_features` on that instance (features.py, video.py), installs the hooks (forward_state.py,
injection.py) and records what it did; a step that fails undoes the earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionModel

from .config import ImageLayout, ManagerConfig
from .errors import ManagerError
from .features import ImageFeatureComputer
from .forward_state import ForwardScope
from .injection import LLMInjection, ProjectorIdleRun
from .managers import ManagerStack
from .video import VideoFeatureComputer

_RECORD = "_llava_manager_patch"  # attribute of the patched LlavaOnevisionModel


@dataclass
class PatchRecord:
    manager_config: ManagerConfig | None
    layout: ImageLayout
    features: ImageFeatureComputer
    injection: LLMInjection | ProjectorIdleRun | None
    scope: ForwardScope | None
    original_config: object | None = None
    video: VideoFeatureComputer | None = None

    def remove_hooks(self) -> None:
        for part in (self.injection, self.video, self.features, self.scope):
            if part is not None:
                part.remove()


def unwrap(model):
    """The model inside DeepSpeed / DDP / accelerate (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


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


def patch_record(model) -> PatchRecord:
    llava = llava_model_of(model)
    record = getattr(llava, _RECORD, None) if llava is not None else None
    if record is None:
        raise ManagerError("this model is not patched by llava-manager")
    return record


def attach_from_config(model) -> None:
    """Attach Managers described by `model.config` (used when a saved patched model is built or loaded)."""
    manager = getattr(model.config, "manager", None)
    resolved = ManagerConfig.from_dict(manager).resolve(model.config) if manager is not None else None
    layout = ImageLayout.from_dict(getattr(model.config, "image_layout", None))
    attach(model, resolved, layout)


def attach(model, config: ManagerConfig | None, layout: ImageLayout) -> PatchRecord:
    """Attach the ManagerStack, the feature computer and the hooks; if any step fails, undo the others and raise."""
    llava = llava_model_of(model)
    scope = features = injection = video = None
    try:
        stack = None
        if config is not None:
            width = (
                model.config.vision_config.hidden_size
                if config.injection == "projector"
                else model.config.text_config.hidden_size
            )
            stack = build_stack(config, width, reference=llava.multi_modal_projector.linear_1.weight)
            stack.train(llava.training)  # a new module starts in training mode; follow the model's
            llava.manager = stack
            scope = ForwardScope(llava)
        features = ImageFeatureComputer(llava, stack, config, layout, scope)
        llava.get_image_features = features
        if config is not None and config.video:
            video = VideoFeatureComputer(llava, stack, config, scope, features.capture)
            llava.get_video_features = video
        if config is not None:
            injection = (LLMInjection if config.injection == "llm" else ProjectorIdleRun)(llava, stack, scope)
    except BaseException:
        for part in (injection, video, features, scope):
            if part is not None:
                part.remove()
        drop_modules(llava)
        raise
    record = PatchRecord(
        manager_config=config, layout=layout, features=features, injection=injection, scope=scope, video=video
    )
    object.__setattr__(llava, _RECORD, record)
    return record


def build_stack(config: ManagerConfig, width: int, reference: torch.Tensor) -> ManagerStack:
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


def drop_modules(llava) -> None:
    llava.__dict__.pop("get_image_features", None)
    llava.__dict__.pop("get_video_features", None)
    if "manager" in llava._modules:
        del llava._modules["manager"]


def detach(model) -> PatchRecord:
    """Remove the hooks, the `manager` submodule and the feature overrides; return the record."""
    llava = llava_model_of(model)
    record = patch_record(model)
    record.remove_hooks()
    object.__delattr__(llava, _RECORD)
    drop_modules(llava)
    return record
