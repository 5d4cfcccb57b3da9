"""Reading and writing videos and images through imageio (ffmpeg for mp4/webm).

Frames travel as float tensors [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mov": "libx264", ".mkv": "libx264"}
# the frame rate of a file when nobody names one: written by a caller that passes none, read from a
# file that states none. Not a model's rate (this module knows no model): callers with one pass
# ``pipe.fps``, the family's.
FALLBACK_FPS = 8.0


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1] (or uint8) -> uint8 numpy."""
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        return frames.cpu().numpy()
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


WRITABLE_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp")
WRITABLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # one frame: images


def check_video_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: an unknown format, a folder
    that is a file or not writable, or (without ``overwrite``) an existing file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name such as {path / 'video.mp4'}")
    if path.suffix.lower() not in WRITABLE_SUFFIXES + WRITABLE_IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unknown video format {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(WRITABLE_SUFFIXES)} (or {', '.join(WRITABLE_IMAGE_SUFFIXES)} for one frame)")
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: exists; pass --overwrite to replace it, or choose another name")
    parent = path.parent
    while not parent.exists():  # the nearest existing folder is the one that must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{path}: the folder {parent} is not writable")
    return path


def write_video(path: str | Path, frames: torch.Tensor, fps: float = FALLBACK_FPS, quality: int = 8) -> Path:
    """Write frames [F, H, W, 3] (float in [0, 1] or uint8) as mp4/webm/gif/webp by suffix.

    The video is written to a temporary file beside ``path``, read back, and only then renamed
    over ``path``: an encoder error or a full disk raises and leaves an earlier file untouched.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported video format {suffix!r}; use .mp4, .webm, .gif or .webp")
    data = to_uint8(frames)
    if suffix in _CODECS and (data.shape[1] % 2 or data.shape[2] % 2):
        raise ValueError(f"{suffix} needs even frame sizes, got {data.shape[2]}x{data.shape[1]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        _encode(tmp, data, fps, quality, suffix)
        _check_written(tmp, data)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, ValueError) and str(e).startswith(str(tmp)):
            raise ValueError(str(e).replace(str(tmp), str(path))) from None
        raise ValueError(f"{path}: writing the video failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         "nothing was written") from None
    return path


def write_output(path: str | Path, frames: torch.Tensor, fps: float = FALLBACK_FPS) -> Path:
    """Frames [F, H, W, 3] as a video, or one frame as an image when ``path`` names an image format."""
    path = Path(path)
    if path.suffix.lower() not in WRITABLE_IMAGE_SUFFIXES:
        return write_video(path, frames, fps)
    if frames.shape[0] != 1:
        raise ValueError(f"{path}: an image holds one frame, got {frames.shape[0]}; use .mp4 for a video")
    return write_image(path, frames[0])


def write_image(path: str | Path, frame: torch.Tensor) -> Path:
    """One frame [H, W, 3] as png/jpg, through a temporary file beside ``path`` (then renamed)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        Image.fromarray(to_uint8(frame)[0]).save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{path}: writing the image failed ({type(e).__name__}: {e}); nothing was written") from None
    return path


def _encode(path: Path, data: np.ndarray, fps: float, quality: int, suffix: str) -> None:
    import imageio.v2 as imageio

    if suffix in _CODECS:
        writer = imageio.get_writer(
            str(path), format="FFMPEG", mode="I", fps=fps, codec=_CODECS[suffix], quality=quality,
            macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error",
        )
        try:
            for frame in data:
                writer.append_data(frame)
        finally:
            writer.close()
    elif suffix == ".gif":
        imageio.mimsave(str(path), list(data), duration=1000.0 / fps, loop=0)
    else:  # .webp
        imageio.mimsave(str(path), list(data), duration=1000.0 / fps, loop=0, lossless=False, quality=90)


def _check_written(path: Path, data: np.ndarray) -> None:
    """The file decodes, and to frames of the written size (a failed encoder leaves an empty or
    unreadable file)."""
    if not path.exists() or path.stat().st_size == 0:
        raise ValueError(f"{path}: the encoder wrote nothing")
    if path.suffix.lower() in _CODECS:
        h, w = read_video(path, max_frames=1)[0].shape[1:3]
    else:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
    if (h, w) != tuple(data.shape[1:3]):
        raise ValueError(f"{path}: reads back as {w}x{h}, not {data.shape[2]}x{data.shape[1]}")


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Frames [F, H, W, 3] float in [0, 1] and the frame rate. Raises ValueError naming the file
    when it cannot be decoded."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    frames = []
    fps = FALLBACK_FPS
    try:
        if path.suffix.lower() == ".gif":
            reader = imageio.get_reader(str(path))
        else:
            reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            meta = reader.get_meta_data()
            if meta.get("fps"):
                fps = float(meta["fps"])
            elif meta.get("duration"):
                fps = 1000.0 / float(meta["duration"])
            for i, frame in enumerate(reader):
                if max_frames is not None and i >= max_frames:
                    break
                frames.append(np.asarray(frame)[..., :3])
        finally:
            reader.close()
    except Exception as e:  # imageio/ffmpeg raise many kinds of errors on broken files
        raise ValueError(f"{path}: cannot be decoded as a video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not frames:
        raise ValueError(f"{path}: contains no frames")
    arr = np.stack(frames)
    if arr.ndim == 3:  # greyscale
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(arr).float() / 255.0, fps


def read_image(path: str | Path) -> torch.Tensor:
    """An image as [H, W, 3] float in [0, 1]."""
    import imageio.v2 as imageio

    try:
        arr = np.asarray(imageio.imread(str(path)))
    except Exception as e:
        raise ValueError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3])).float() / 255.0
