"""Reading and writing videos and images through imageio (ffmpeg for mp4/webm).

Frames travel as float tensors [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mov": "libx264", ".mkv": "libx264"}


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1] (or uint8) -> uint8 numpy."""
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        return frames.cpu().numpy()
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def write_video(path: str | Path, frames: torch.Tensor, fps: float = 8.0, quality: int = 8) -> Path:
    """Write frames [F, H, W, 3] (float in [0, 1] or uint8) as mp4/webm/gif/webp by suffix."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    suffix = path.suffix.lower()
    if suffix in _CODECS:
        if data.shape[1] % 2 or data.shape[2] % 2:
            raise ValueError(f"{suffix} needs even frame sizes, got {data.shape[2]}x{data.shape[1]}")
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
    elif suffix == ".webp":
        imageio.mimsave(str(path), list(data), duration=1000.0 / fps, loop=0, lossless=False, quality=90)
    else:
        raise ValueError(f"{path}: unsupported video format {suffix!r}; use .mp4, .webm, .gif or .webp")
    return path


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Frames [F, H, W, 3] float in [0, 1] and the frame rate. Raises ValueError naming the file
    when it cannot be decoded."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    frames = []
    fps = 8.0
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
