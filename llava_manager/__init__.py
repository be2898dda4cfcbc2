"""llava-manager: Managers (arXiv 2506.11515) for Hugging Face LLaVA-OneVision.

    from llava_manager import ManagerConfig, patch_llava
    model = patch_llava(model, ManagerConfig())
"""

__version__ = "0.1.0"

from .config import ImageLayout, ManagerConfig, ManagerConfigError, ManagerError  # noqa: E402
from .modeling import (  # noqa: E402  (registers the model type with the Auto classes)
    LlavaOnevisionManagerConfig,
    LlavaOnevisionManagerForConditionalGeneration,
)
from . import processor as _processor  # noqa: E402,F401  (registers the processor classes with the Auto classes)
from .convert import ConversionError, load_original  # noqa: E402
from .hub import HubError, from_pretrained  # noqa: E402
from .patch import is_patched, patch_llava, unpatch_llava  # noqa: E402

__all__ = [
    "ConversionError",
    "HubError",
    "from_pretrained",
    "ImageLayout",
    "LlavaOnevisionManagerConfig",
    "LlavaOnevisionManagerForConditionalGeneration",
    "ManagerConfig",
    "ManagerConfigError",
    "ManagerError",
    "is_patched",
    "load_original",
    "patch_llava",
    "unpatch_llava",
]
