"""Deprecation paths for names that moved: old import locations keep working, with a `DeprecationWarning`."""

from __future__ import annotations

import importlib
import warnings


def forward_moved_names(module_name: str, new_homes: dict[str, str]):
    """A module-level `__getattr__` for `module_name` that finds each name of `new_homes` in its new module."""

    def __getattr__(name: str):
        if name not in new_homes:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        warnings.warn(
            f"{module_name}.{name} moved to {new_homes[name]}.{name}; import it from there (the old location goes "
            "away in llava-manager 1.0)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_homes[name]), name)

    return __getattr__
