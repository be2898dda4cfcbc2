"""The model a recipe trains: load it (or build it from a config), fit the processor to its image layout,
patch the recipe's Managers, check the processor, add LoRA. Every input error is a `RecipeError` naming the key."""

from __future__ import annotations

import dataclasses
import logging

from ..errors import ManagerError
from .recipe import Recipe, RecipeError

logger = logging.getLogger("llava_manager.train")


def _llava_classes():
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def import_model_modules(config=None) -> None:
    """Import the modeling modules of LLaVA-OV and its parts now, not inside `deepspeed.zero.Init`.

    A module that transformers imports lazily while zero.Init is active defines its classes there: zero.Init wraps
    their `__init__` and, on exit, restores the one it saw first, dropping what decorators added after the class
    statement (transformers' `use_kernelized_func` on Qwen2Attention: every Qwen2 model built later in the process
    then fails with "'Qwen2Attention' object has no attribute '_kernel_funcs'")."""
    from transformers import AutoModel, LlavaOnevisionForConditionalGeneration  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401  (LLaVA-OV's LLM and vision tower)
    from transformers.models.siglip import modeling_siglip  # noqa: F401

    for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and type(sub) in AutoModel._model_mapping:
            AutoModel._model_mapping[type(sub)]  # noqa: B018  (the lookup imports the class's module)


def load_for_training(recipe: Recipe):
    """The model (on CPU) and its processor, per the recipe; raises `RecipeError` for non-LLaVA-OV models.

    Checkpoints load in bf16 for DeepSpeed bf16 runs (DeepSpeed keeps fp32 master weights), else in fp32."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    import llava_manager  # noqa: F401  (registers the llava_onevision_manager model type)

    llava_cls = _llava_classes()
    dtype = torch.bfloat16 if recipe.bf16 and recipe.deepspeed is not None else torch.float32
    if recipe.model_config is not None:
        path = recipe.model_config_path()
        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as error:  # noqa: BLE001  (any failure: report it against the recipe key)
            raise RecipeError(
                f"recipe key 'model_config' = {recipe.model_config!r}: cannot read {path} ({error})"
            ) from None
        if config.model_type not in ("llava_onevision", "llava_onevision_manager"):
            raise RecipeError(
                f"recipe key 'model_config' = {recipe.model_config!r}: {path} is a {config.model_type!r} config, "
                "not LLaVA-OneVision (llava_onevision)"
            )
        transformers.set_seed(recipe.seed)
        import_model_modules(config)
        # built whole even under ZeRO-3 (DeepSpeed partitions it when training starts): transformers 5.15's
        # from_config under zero.Init initialises empty shards ("Fan in and fan out can not be computed ...");
        # random models are small (tests, the demo; `llava-manager build` writes a checkpoint that loads partitioned)
        from ..checkpoint.loading import _without_zero3_init

        with _without_zero3_init():
            model = AutoModelForImageTextToText.from_config(config)
        model.name_or_path = ""  # a random model: not the config file (PEFT would look for weights there)
        processor = _processor_for(recipe, config)
    else:
        from llava_manager import from_pretrained as load

        import_model_modules()
        extra = {"distributed_config": sharded_fsdp_config(recipe)} if recipe.loads_sharded() else {}
        try:
            model, processor = load(recipe.model_name_or_path, subfolder=recipe.model_subfolder, dtype=dtype, **extra)
        except ManagerError as error:
            raise RecipeError(f"recipe key 'model_name_or_path' = {recipe.model_name_or_path!r}: {error}") from None
        if recipe.processor is not None:
            processor = _processor_for(recipe, model.config)
    if not isinstance(model, llava_cls):
        raise RecipeError(
            f"recipe key 'model_name_or_path' = {recipe.model_name_or_path!r} loads a {type(model).__name__}, "
            "not a LLaVA-OneVision model (LlavaOnevisionForConditionalGeneration)"
        )
    return model, processor


def distributed_config_class():
    """transformers' `DistributedConfig`, for `fsdp_loading: sharded`; `RecipeError` where this transformers cannot
    train a model sharded at load (call it before any process group starts)."""
    import dataclasses

    from transformers import Trainer

    try:
        from transformers.distributed.configuration_utils import DistributedConfig
    except ImportError:
        DistributedConfig = None
    loads = DistributedConfig is not None and "fsdp_size" in {f.name for f in dataclasses.fields(DistributedConfig)}
    if not loads or not hasattr(Trainer, "_sync_replicated_trainable_parameters"):
        import transformers

        raise RecipeError(
            f"recipe key 'fsdp_loading' = 'sharded' needs a transformers that trains models sharded at load "
            f"(from_pretrained(distributed_config=...) and a Trainer that keeps added parameters in step; 5.25 has "
            f"both); this is {transformers.__version__}. Use fsdp_loading: accelerate"
        )
    return DistributedConfig


def sharded_fsdp_config(recipe: Recipe):
    """transformers' `DistributedConfig` for `fsdp_loading: sharded`: FSDP2 over every process of the run, each
    rank reading only its shard of the checkpoint (transformers' own FSDP plan picks the units)."""
    import torch.distributed as dist

    fsdp = recipe.fsdp_config() or {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    return distributed_config_class()(fsdp_size=world, fsdp_cpu_offload=bool(fsdp.get("cpu_offload", False)))


def _processor_for(recipe: Recipe, config):
    if recipe.processor == "tiny":
        from llava_manager.testing.tiny import tiny_processor

        return tiny_processor(config)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(recipe.processor)
    except Exception as error:  # noqa: BLE001  (any failure: report it against the recipe key)
        raise RecipeError(f"recipe key 'processor' = {recipe.processor!r}: cannot load it ({error})") from None


def configure_images(recipe: Recipe, model, processor):
    """Apply `image_aspect_ratio` / `image_grid_pinpoints` to model and processor; returns (processor, layout)."""
    from llava_manager import ImageLayout, is_patched

    config = model.config
    layout = ImageLayout.from_dict(getattr(config, "image_layout", None)) if is_patched(model) else ImageLayout()
    if recipe.image_aspect_ratio is not None:
        mode = "square" if recipe.image_aspect_ratio == "square" else "anyres"
        if mode != layout.mode and is_patched(model):
            raise RecipeError(
                f"recipe key 'image_aspect_ratio' = {recipe.image_aspect_ratio!r} but the model is already patched "
                f"with the {layout.mode!r} image layout"
            )
        layout = dataclasses.replace(layout, mode=mode)
        if mode == "anyres":
            config.vision_aspect_ratio = recipe.image_aspect_ratio
            processor.vision_aspect_ratio = recipe.image_aspect_ratio
    pinpoints = recipe.resolve_pinpoints(config.vision_config.image_size)
    if pinpoints is not None:
        config.image_grid_pinpoints = [list(p) for p in pinpoints]
        processor.image_processor.image_grid_pinpoints = [list(p) for p in pinpoints]
    processor_mode = (getattr(processor, "image_layout", None) or {}).get("mode", "anyres")
    if layout.mode == "square" and processor_mode != "square":
        processor = _square_processor(processor)
    elif layout.mode != processor_mode:
        raise RecipeError(
            f"the processor counts image tokens for a {processor_mode!r} layout but the model uses {layout.mode!r}; "
            "use the model's own processor (recipe key 'processor')"
        )
    return processor, layout


def _square_processor(processor):
    """llava-manager's processor in square mode (one crop per image, no newline), from an HF LLaVA-OV one."""
    from llava_manager.processor import LlavaOnevisionManagerImageProcessor, LlavaOnevisionManagerProcessor

    source = processor.image_processor
    image_processor = LlavaOnevisionManagerImageProcessor(
        size=dict(source.size),
        image_mean=list(source.image_mean),
        image_std=list(source.image_std),
        image_grid_pinpoints=[list(p) for p in source.image_grid_pinpoints],
        crop_mode="square",
    )
    return LlavaOnevisionManagerProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        video_processor=getattr(processor, "video_processor", None),
        num_image_tokens=processor.num_image_tokens,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        vision_aspect_ratio=processor.vision_aspect_ratio,
        image_layout={"mode": "square"},
    )


def patch_model(recipe: Recipe, model, layout, tokenizer=None):
    """Patch with the recipe's Managers unless the model is patched already (then the recipe must agree).

    Adaptive Managers without `query_token_id` in the recipe get the id of `<|im_start|>` in `tokenizer`."""
    from llava_manager import ImageLayout, ManagerConfig, is_patched, patch_llava
    from llava_manager.config import ADAPTIVE_TYPES

    manager = recipe.manager
    if manager and manager.get("manager_type") in ADAPTIVE_TYPES and manager.get("query_token_id") is None:
        query_id = tokenizer.convert_tokens_to_ids("<|im_start|>") if tokenizer is not None else None
        if query_id is None or query_id == getattr(tokenizer, "unk_token_id", None):
            raise RecipeError(
                f"recipe key 'manager': {manager['manager_type']} Managers find the instruction by <|im_start|>, "
                "which this tokenizer lacks; set manager.query_token_id to the id that opens each turn"
            )
        recipe.manager = {**manager, "query_token_id": int(query_id)}

    if is_patched(model):
        current = getattr(model.config, "manager", None)
        if recipe.manager is not None and current is not None:
            wanted = ManagerConfig(**recipe.manager).resolve(model.config).to_dict()
            differs = {
                k: (current.get(k), v)
                for k, v in wanted.items()
                if recipe.manager.get(k) is not None and current.get(k) != v
            }
            if differs:
                logger.warning(
                    "the model is already patched; keeping its Managers (recipe 'manager' differs: %s)", differs
                )
        if recipe.manager is not None and current is None:
            raise RecipeError("recipe key 'manager' asks for Managers but the model is patched without any")
        return model
    if recipe.manager is None and layout == ImageLayout():
        return model
    if recipe.manager is None:  # no Managers, but a non-default image layout
        return patch_llava(model, layout=layout, managers=False)
    try:
        return patch_llava(model, ManagerConfig(**recipe.manager), layout=layout)
    except ManagerError as error:
        raise RecipeError(f"recipe key 'manager': {error}") from None


def check_processor(model, processor) -> None:
    image_id = model.config.image_token_id
    if processor.image_token_id != image_id:
        raise RecipeError(
            f"the processor's image token id {processor.image_token_id} differs from the model's {image_id}; "
            "use the model's own processor (recipe key 'processor')"
        )
    if processor.tokenizer.pad_token_id is None:
        raise RecipeError("the processor's tokenizer has no pad token")


def check_video_support(model, processor) -> None:
    """Video data needs the model's video token in the processor and a video processor (torchvision)."""
    video_id = getattr(model.config, "video_token_id", None)
    if video_id is None:
        raise RecipeError("the data has videos but the model config has no video_token_id (not a LLaVA-OV model?)")
    if getattr(processor, "video_processor", None) is None:
        raise RecipeError(
            "the data has videos but the processor has no video processor (it needs torchvision): "
            "pip install 'llava-manager[video]'"
        )
    if processor.video_token_id != video_id:
        raise RecipeError(
            f"the processor's video token id {processor.video_token_id} differs from the model's {video_id}; "
            "use the model's own processor (recipe key 'processor')"
        )


def apply_lora(recipe: Recipe, model):
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target"],
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config), config
    except ValueError as error:
        raise RecipeError(f"recipe key 'lora.target' = {lora['target']!r}: {error}") from None
