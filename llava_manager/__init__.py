"""llava-manager: Managers (arXiv 2506.11515) for Hugging Face LLaVA-OneVision.

from llava_manager import ManagerConfig, patch_llava
model = patch_llava(model, ManagerConfig())
"""

from .version import __version__  # noqa: F401


def _transformers_requirement():
    """The `transformers` requirement setup.cfg declares (read from the installed package's metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        for line in metadata.requires("llava-manager") or ():
            requirement = Requirement(line)
            if requirement.name == "transformers" and requirement.marker is None:
                return requirement
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed: nothing to check against
        pass
    return None


def _check_transformers_version() -> None:
    import transformers

    requirement = _transformers_requirement()
    if requirement is not None and not requirement.specifier.contains(transformers.__version__, prereleases=True):
        raise ImportError(
            f"llava-manager is tested with {requirement} (the range in its README); found transformers "
            f"{transformers.__version__}. Run: pip install '{requirement}'"
        )


_check_transformers_version()

from . import processor as _processor  # noqa: E402,F401  (registers the processor classes with the Auto classes)
from .checkpoint import from_pretrained, load_original  # noqa: E402
from .checkpoint.managers_only import load_managers, save_managers  # noqa: E402
from .config import ImageLayout, ManagerConfig  # noqa: E402
from .errors import ConversionError, HubError, ManagerConfigError, ManagerError  # noqa: E402
from .modeling import (  # noqa: E402  (registers the model type with the Auto classes)
    LlavaOnevisionManagerConfig,
    LlavaOnevisionManagerForConditionalGeneration,
    LlavaOnevisionManagerModel,
)
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
    "load_managers",
    "load_original",
    "patch_llava",
    "save_managers",
    "unpatch_llava",
]
