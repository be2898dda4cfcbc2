"""llava-manager: Managers (arXiv 2506.11515) for Hugging Face LLaVA-OneVision.

    from llava_manager import ManagerConfig, patch_llava
    model = patch_llava(model, ManagerConfig())
"""

__version__ = "0.1.0"


def _check_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    found = Version(transformers.__version__)
    if not Version("5.6") <= found < Version("6"):
        raise ImportError(
            f"llava-manager needs transformers >=5.6,<6 (the flattened SigLIP and generate()'s mm_encoder_outputs); "
            f"found {transformers.__version__}. Run: pip install 'transformers>=5.6,<6'"
        )


_check_transformers_version()

from .config import ImageLayout, ManagerConfig, ManagerConfigError, ManagerError  # noqa: E402
from .modeling import (  # noqa: E402  (registers the model type with the Auto classes)
    LlavaOnevisionManagerConfig,
    LlavaOnevisionManagerForConditionalGeneration,
    LlavaOnevisionManagerModel,
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
    "LlavaOnevisionManagerModel",
    "ManagerConfig",
    "ManagerConfigError",
    "ManagerError",
    "is_patched",
    "load_original",
    "patch_llava",
    "unpatch_llava",
]
