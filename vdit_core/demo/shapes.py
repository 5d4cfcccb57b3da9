"""The demo world: simple shapes of six colours moving in four directions on a dark background.

Clips are 17 frames of 64x64 at 8 fps, captioned "a red circle moving right". A seed fixes the
whole dataset, including which shape/colour/motion combinations are held out of training.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.15, 0.82, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.62, 0.18, 0.90),
}
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards
BACKGROUND = (0.06, 0.06, 0.08)
FRAMES, SIZE, FPS = 17, 64, 8


@dataclass(frozen=True)
class Combo:
    shape: str
    colour: str
    motion: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.motion}"

    @property
    def partial_captions(self) -> tuple[str, str]:
        """The caption without its colour, and without its motion: what the clip still shows."""
        return f"a {self.shape} moving {self.motion}", f"a {self.colour} {self.shape}"


ALL_COMBOS = [Combo(s, c, m) for s, c, m in itertools.product(SHAPES, COLOURS, MOTIONS)]


def held_out_combos(seed: int = 0, count: int = 10) -> list[Combo]:
    """Combinations never shown in training: each shape, colour and motion keeps appearing in
    other training combinations, so every held-out prompt is a new composition of known parts."""
    rng = random.Random(seed)
    combos = list(ALL_COMBOS)
    rng.shuffle(combos)
    chosen: list[Combo] = []
    for c in combos:  # spread the held-out set over every shape, colour and motion
        if len(chosen) == count:
            break
        if sum(x.shape == c.shape for x in chosen) >= math.ceil(count / len(SHAPES)):
            continue
        if sum(x.colour == c.colour for x in chosen) >= math.ceil(count / len(COLOURS)):
            continue
        if sum(x.motion == c.motion for x in chosen) >= math.ceil(count / len(MOTIONS)):
            continue
        chosen.append(c)
    return sorted(chosen, key=lambda c: (c.shape, c.colour, c.motion))


def train_combos(seed: int = 0) -> list[Combo]:
    held = set(held_out_combos(seed))
    return [c for c in ALL_COMBOS if c not in held]


def _mask(shape: str, cx: torch.Tensor, cy: torch.Tensor, r: float, size: int, ss: int = 4) -> torch.Tensor:
    """Anti-aliased coverage [F, size, size] of a shape centred at (cx[t], cy[t]), half-size r."""
    n = size * ss
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / ss
    dx = coords[None, None, :] - cx[:, None, None]  # [F, 1, n]
    dy = coords[None, :, None] - cy[:, None, None]  # [F, n, 1]
    if shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "square":
        s = r * 0.9
        m = (dx.abs() <= s) & (dy.abs() <= s)
    elif shape == "triangle":  # pointing up, base at the bottom of the r-box
        rel = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base
        m = (rel >= 0) & (rel <= 1) & (dx.abs() <= rel * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return F.avg_pool2d(m.float()[:, None], ss)[:, 0]


def render(combo: Combo, rng: random.Random, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """One clip [F, H, W, 3] in [0, 1] with a random size, speed, start and brightness."""
    r = rng.uniform(10.0, 13.0)  # large enough to span several latent cells (the VAE is 8x)
    speed = rng.uniform(1.0, 1.5)
    dx, dy = MOTIONS[combo.motion]
    travel = speed * (frames - 1)
    margin = r + 2
    lo_x, hi_x = margin + max(0, -dx) * travel, size - margin - max(0, dx) * travel
    lo_y, hi_y = margin + max(0, -dy) * travel, size - margin - max(0, dy) * travel
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    gain = rng.uniform(0.9, 1.05)
    colour = torch.tensor([min(1.0, v * gain) for v in COLOURS[combo.colour]])
    bg = torch.tensor(BACKGROUND)
    t = torch.arange(frames, dtype=torch.float32)
    m = _mask(combo.shape, x0 + dx * speed * t, y0 + dy * speed * t, r, size)[..., None]  # [F, H, W, 1]
    return bg * (1 - m) + colour * m


def write_dataset(out: str | Path, seed: int = 0, clips_per_combo: int = 16, combos: list[Combo] | None = None) -> list[Path]:
    """Write mp4 clips + same-name .txt captions for the training combinations."""
    from ..video_io import write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for combo in combos if combos is not None else train_combos(seed):
        for k in range(clips_per_combo):
            stem = f"{combo.shape}_{combo.colour}_{combo.motion}_{k:02d}"
            write_video(out / f"{stem}.mp4", render(combo, rng), fps=FPS, quality=10)
            (out / f"{stem}.txt").write_text(combo.caption)
            paths.append(out / f"{stem}.mp4")
    return paths


def write_partial_captions(data: str | Path, out: str | Path, seed: int = 0) -> Path:
    """``out/metadata.jsonl`` listing every clip of ``data`` (written by :func:`write_dataset`)
    twice: with its caption, and with one of its partial captions (seeded choice).

    A transformer trained on whole captions only learns each combination's look as a whole; on a
    held-out combination one attribute can then drag another with it (a green square moving down
    came out round). Captions that leave an attribute out teach each word's effect on its own.
    """
    import json

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_caption = {c.caption: c for c in ALL_COMBOS}
    rng = random.Random(seed)
    rows = []
    for video in sorted(data.glob("*.mp4")):
        combo = by_caption[video.with_suffix(".txt").read_text().strip()]
        rel = os.path.relpath(video, out)
        rows += [{"path": rel, "caption": combo.caption}, {"path": rel, "caption": rng.choice(combo.partial_captions)}]
    meta = out / "metadata.jsonl"
    tmp = meta.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(meta)
    return meta
