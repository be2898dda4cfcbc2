"""Reading images and videos from disk, with errors that name the file: used by chat, training data and eval.

A video is a file (decoded by transformers' `load_video` with PyAV: the `video` extra) or a folder of frame images
(sorted by name). Frames are sampled uniformly over the clip:

- `exact=False` (chat, eval): at most `num_frames`, never a frame twice, so a short clip gives fewer frames;
- `exact=True` (training): exactly `num_frames`, a short clip repeating frames, as LLaVA-NeXT's `frames_upbound` with
  `force_sample`. Every video of a batch then has the same frame count, which `pixel_values_videos` (one tensor)
  needs.

Positions are rounded to the nearest frame; `floor=True` truncates them instead, as lmms-eval's `llava_onevision`
model does (`np.linspace(..., dtype=int)`), which the lmms-eval model here uses to see the frames it would see.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ImageError, VideoError

VIDEO_FRAMES = 32  # LLaVA-OV's video evaluation (lmms-eval's llava_onevision model) samples 32 frames
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(paths: list[str | os.PathLike]) -> list:
    """Open every image as RGB; raises `ImageError` naming the first missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ImageError(f"image {str(path)!r} does not exist; check the path")
        if not path.is_file():
            raise ImageError(f"image {str(path)!r} is not a file")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except UnidentifiedImageError:
            raise ImageError(
                f"cannot read image {str(path)!r}: not an image format PIL knows (PNG, JPEG, ...)"
            ) from None
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageError(f"cannot read image {str(path)!r}: {error} (truncated or corrupt file?)") from None
    return images


def frame_indices(total: int, num_frames: int, exact: bool = False, floor: bool = False):
    """Indices of the frames to keep out of `total`, uniformly spread, first and last included (see the module
    docstring for `exact` and `floor`)."""
    import numpy as np

    positions = np.linspace(0, total - 1, num_frames if exact else min(num_frames, total))
    picks = (positions if floor else positions.round()).astype(int)
    return picks if exact else np.unique(picks)


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a video folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def load_video(path: str | os.PathLike, num_frames: int = VIDEO_FRAMES, exact: bool = False, floor: bool = False):
    """`(F, H, W, 3)` uint8 frames sampled uniformly over the video: `F = min(num_frames, frames available)`, or
    `F = num_frames` with `exact=True`.

    Raises `VideoError` naming the path when it is missing, empty or cannot be decoded."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise VideoError(f"video {str(path)!r} does not exist; check the path")
    if num_frames < 1:
        raise VideoError(f"num_frames {num_frames}: sample at least one frame")
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise VideoError(f"video folder {str(path)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        picks = frame_indices(len(files), num_frames, exact, floor)
        try:
            opened = dict(zip(sorted(set(picks)), load_images([files[i] for i in sorted(set(picks))])))
            return np.stack([np.asarray(opened[i]) for i in picks])
        except ImageError as error:
            raise VideoError(f"video folder {str(path)!r}: {error}") from None
        except ValueError:
            raise VideoError(f"video folder {str(path)!r}: its frames differ in size") from None
    try:
        import av  # noqa: F401  (transformers' default video decoder)
    except ImportError:
        raise VideoError(
            f"decoding {str(path)!r} needs PyAV: pip install 'llava-manager[video]' (or pip install av), or pass a "
            "folder of frame images"
        ) from None
    from transformers.video_utils import load_video as transformers_load_video

    def uniform(metadata, **_kwargs):
        return np.unique(frame_indices(int(metadata.total_num_frames), num_frames, floor=floor))

    try:
        frames, _metadata = transformers_load_video(str(path), sample_indices_fn=uniform)
    except Exception as error:  # PyAV raises its own error types for every kind of broken file
        raise VideoError(f"cannot decode video {str(path)!r}: {error}") from None
    if len(frames) == 0:
        raise VideoError(f"video {str(path)!r} has no frames")
    frames = np.asarray(frames)
    if exact and len(frames) != num_frames:  # repeat the decoded frames at the positions exact sampling picks
        frames = frames[frame_indices(len(frames), num_frames, exact=True, floor=floor)]
    return frames


def video_problem(path: str, mode: str) -> str | None:
    """Why a training video cannot be used (`"missing"`, `"unreadable (...)"`), or None. `mode`: `exists` stats
    the file or folder, `open` decodes it."""
    if not os.path.exists(path):
        return "missing"
    if mode == "open":
        try:
            load_video(path, num_frames=1)
        except VideoError as error:
            return f"unreadable ({error})"
    return None
