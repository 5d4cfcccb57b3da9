"""Training data: finding clips and captions, decoding, frame sampling, resizing, buckets.

A dataset is a folder of videos (mp4/webm/gif/...) and images, each with a same-name ``.txt``
caption, or a folder with ``metadata.csv`` / ``metadata.jsonl`` giving (path, caption). Files
that cannot be used are reported by name with the reason and skipped, never a crash later.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, read_video


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass
class Report:
    """What a dataset scan and decode found."""

    usable: int = 0
    skipped: list = None  # (path, reason)

    def __post_init__(self):
        self.skipped = self.skipped or []

    def skip(self, path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def lines(self) -> list[str]:
        out = [f"dataset: {self.usable} usable clip(s), {len(self.skipped)} skipped"]
        for path, reason in self.skipped:
            out.append(f"  skipped {path}: {reason}")
        return out


def scan(root: str | Path, report: Report) -> list[Sample]:
    """The clips of a dataset folder with their captions (missing captions are reported)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: dataset folder not found")
    for name in ("metadata.csv", "metadata.jsonl"):
        if (root / name).exists():
            return _from_metadata(root, root / name, report)
    samples = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES or not path.is_file():
            continue
        caption_file = path.with_suffix(".txt")
        if not caption_file.exists():
            report.skip(path, "missing caption (no same-name .txt file)")
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            report.skip(path, f"caption file {caption_file.name} is not UTF-8 text (byte {e.start}); save it as UTF-8")
            continue
        if not caption:
            report.skip(path, "empty caption file")
            continue
        samples.append(Sample(path, caption))
    return samples


def _from_metadata(root: Path, meta: Path, report: Report) -> list[Sample]:
    rows = []
    try:
        if meta.suffix == ".csv":
            with open(meta, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{meta}: cannot be parsed ({e})") from None
    samples = []
    for i, row in enumerate(rows):
        rel = row.get("path") or row.get("file") or row.get("video")
        caption = (row.get("caption") or row.get("text") or row.get("prompt") or "").strip()
        if not rel:
            report.skip(f"{meta.name}:{i + 1}", "row has no path")
            continue
        path = (root / rel) if not Path(rel).is_absolute() else Path(rel)
        if not path.exists():
            report.skip(path, "file listed in metadata does not exist")
        elif not caption:
            report.skip(path, "missing caption")
        else:
            samples.append(Sample(path, caption))
    return samples


def parse_buckets(spec: str, frame_spec: str, default: Bucket) -> tuple[list[tuple[int, int]], list[int]]:
    sizes = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            h, w = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {item!r} is not HEIGHTxWIDTH") from None
        sizes.append((h, w))
    frames = [int(x) for x in frame_spec.split(",") if x.strip()]
    return sizes or [(default.height, default.width)], sorted(frames or [default.frames])


def choose_bucket(n_frames: int, h: int, w: int, sizes: list[tuple[int, int]], frames: list[int], stride: int) -> Bucket | None:
    """The spatial bucket closest in aspect ratio, and the longest frame bucket the clip fills."""
    bh, bw = min(sizes, key=lambda s: abs(math.log((s[0] / s[1]) / (h / w))))
    fits = [f for f in frames if (f - 1) * stride + 1 <= n_frames]
    if not fits:
        return None
    return Bucket(max(fits), bh, bw)


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [F, height, width, 3]: scale to cover, then centre-crop."""
    x = frames.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top : top + height, left : left + width].permute(0, 2, 3, 1).clamp(0, 1)


def load_clip(sample: Sample, sizes, frame_buckets, model_fps: float, stride: int = 0) -> tuple[torch.Tensor, Bucket]:
    """Decode, pick the bucket, sample frames (every ``stride``-th; 0 matches the model's frame
    rate) from the start, resize and crop. Raises ValueError with the reason if unusable."""
    if sample.path.suffix.lower() in IMAGE_SUFFIXES:
        frames, fps = read_image(sample.path)[None], model_fps
    else:
        frames, fps = read_video(sample.path)
    n, h, w = frames.shape[:3]
    step = stride or max(1, round(fps / model_fps))
    bucket = choose_bucket(n, h, w, sizes, frame_buckets, step)
    if bucket is None and step > 1:  # too short at the model's rate: use every frame
        step = 1
        bucket = choose_bucket(n, h, w, sizes, frame_buckets, step)
    if bucket is None:
        raise ValueError(f"too few frames ({n}; the shortest bucket needs {min(frame_buckets)})")
    frames = frames[: (bucket.frames - 1) * step + 1 : step]
    return resize_crop(frames, bucket.height, bucket.width), bucket
