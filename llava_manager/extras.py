"""The optional parts of llava-manager and what each needs: `pip install "llava-manager[train]"` and so on.

The core (patching, loading, converting, chat) needs only what `pip install llava-manager` brings. The apps that
need more call `require_extra` first, so a missing package gives one line that names the extra to install.
"""

from __future__ import annotations

import importlib.util

#: extra (setup.cfg `extras_require`) -> the modules it provides that the code imports
EXTRA_MODULES = {
    "train": ("deepspeed", "peft", "accelerate", "yaml"),
    "eval": ("lmms_eval", "accelerate"),
    "plot": ("matplotlib",),
    "vision": ("torchvision",),
    "video": ("torchvision", "av"),
}


def missing_modules(extra: str) -> list[str]:
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked with sys.modules[name] = None
            found = False
        if not found:
            missing.append(module)
    return missing


def require_extra(extra: str, purpose: str) -> None:
    """Raise `ImportError` naming the extra when a module it provides is missing."""
    missing = missing_modules(extra)
    if missing:
        raise ImportError(
            f"{purpose} needs {', '.join(missing)}, which a plain `pip install llava-manager` leaves out: "
            f"pip install 'llava-manager[{extra}]'"
        )
