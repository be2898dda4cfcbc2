"""Every error llava-manager raises on bad input, in one place (the ground floor: imports nothing).

All but `CommandError` derive from `ManagerError` (itself a `ValueError`), so `except ManagerError` catches any
bad input the library refused. Each message names the problem and the fix.
"""


class ManagerError(ValueError):
    """Base class of every error llava-manager raises on bad input."""


class ManagerConfigError(ManagerError):
    """A `ManagerConfig` / `ImageLayout` value that does not fit (the model)."""


class ConversionError(ManagerError):
    """A checkpoint that cannot be read or converted (says which file / key / field)."""


class HubError(ManagerError):
    """A repo, subfolder or revision that cannot be found (or reached), with what to do about it."""


class ImageError(ManagerError):
    """An image that does not exist or cannot be decoded (the message names the file)."""


class VideoError(ManagerError):
    """A video (file or folder of frames) that does not exist or cannot be decoded (the message names it)."""


class RecipeError(ManagerError):
    """A recipe key that is unknown, missing or has a bad value (the message names the key)."""


class DataError(ManagerError):
    """Bad training data: the message names the file, the sample and the problem."""


class DemoError(ManagerError):
    """The demo cannot run as asked (its output folder holds something else, training failed, ...)."""


class RequestError(ManagerError):
    """A generation request the model cannot answer as asked (empty question, bad sampling value, a prompt longer
    than the model's context)."""


class CommandError(Exception):
    """An error the `llava-manager` command shows as one or two lines (no traceback unless --debug)."""
