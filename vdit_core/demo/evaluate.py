"""Measuring what a demo video shows: the moving object's colour, shape and direction.

* colour: the mean colour of the object's pixels, nearest of the six palette colours;
* shape: which ideal shape (circle, square, upward triangle) of the object's area, centred on its
  centroid, overlaps it best (mean IoU over the frames): unlike the share of its bounding box it
  fills (also reported), this holds for blurred shapes (checked on ground truth blurred with
  sigmas up to 2.5 px: 100%);
* motion: the sign of the larger axis of the centroid track's least-squares slope.

The object is every pixel that differs from the background (the clip's median colour) by at least
half of the largest difference in the clip: the half-maximum boundary, which blur hardly moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .shapes import COLOURS, MOTIONS, SHAPES, Combo

_PALETTE = torch.tensor(list(COLOURS.values()))
_NAMES = list(COLOURS)


@dataclass
class Analysis:
    colour: str | None
    shape: str | None
    motion: str | None
    fill: float = float("nan")
    slope: tuple = (float("nan"), float("nan"))
    visible_frames: int = 0

    def matches(self, combo: Combo) -> dict[str, bool]:
        return {"colour": self.colour == combo.colour, "shape": self.shape == combo.shape, "motion": self.motion == combo.motion}


def analyse(frames: torch.Tensor, min_contrast: float = 0.2, min_area: int = 6) -> Analysis:
    """Measure a clip [F, H, W, 3] in [0, 1]. Nothing is claimed for a clip whose largest
    difference from the background is below ``min_contrast``."""
    frames = frames.float()
    bg = frames.reshape(-1, 3).median(dim=0).values
    diff = (frames - bg).abs().amax(-1)  # [F, H, W]
    peak = float(diff.max())
    if peak < min_contrast:
        return Analysis(None, None, None)
    mask = diff >= 0.5 * peak
    visible = [t for t in range(frames.shape[0]) if mask[t].sum() >= min_area]
    if len(visible) < 2:
        return Analysis(None, None, None, visible_frames=len(visible))
    pixels = frames[mask]
    colour = _NAMES[int(((_PALETTE - pixels.mean(0)) ** 2).sum(1).argmin())]
    fills, cx, cy = [], [], []
    overlap = {s: 0.0 for s in SHAPES}
    ys, xs = torch.meshgrid(torch.arange(frames.shape[1]) + 0.5, torch.arange(frames.shape[2]) + 0.5, indexing="ij")
    for t in visible:
        m = mask[t]
        y, x = ys[m], xs[m]
        box = (y.max() - y.min() + 1) * (x.max() - x.min() + 1)
        fills.append(float(m.sum() / box))
        cx.append(float(x.mean()))
        cy.append(float(y.mean()))
        for s in SHAPES:
            tm = _template(s, cy[-1], cx[-1], float(m.sum()), ys, xs)
            overlap[s] += float((m & tm).sum() / (m | tm).sum())
    fill = sorted(fills)[len(fills) // 2]
    shape = max(overlap, key=overlap.get)
    tt = torch.tensor(visible, dtype=torch.float32)
    tt = tt - tt.mean()
    sx = float((tt * (torch.tensor(cx) - sum(cx) / len(cx))).sum() / (tt * tt).sum())
    sy = float((tt * (torch.tensor(cy) - sum(cy) / len(cy))).sum() / (tt * tt).sum())
    if abs(sx) >= abs(sy):
        motion = "right" if sx > 0 else "left"
    else:
        motion = "down" if sy > 0 else "up"
    return Analysis(colour, shape, motion, fill, (sx, sy), len(visible))


def _template(shape: str, cy: float, cx: float, area: float, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """An ideal shape of ``area`` pixels whose centroid is (cy, cx), as drawn by the generator."""
    if shape == "circle":
        r = math.sqrt(area / math.pi)
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    if shape == "square":
        h = math.sqrt(area) / 2
        return ((ys - cy).abs() <= h) & ((xs - cx).abs() <= h)
    r = math.sqrt(area / 2)  # upward triangle of height 2r and base 2r; centroid 2/3 down from the apex
    rel = (ys - (cy - 4 * r / 3)) / (2 * r)
    return (rel >= 0) & (rel <= 1) & ((xs - cx).abs() <= rel * r)


@dataclass
class Scores:
    """Per-attribute accuracy over a set of generated videos."""

    n: int = 0
    correct: dict = field(default_factory=lambda: {"colour": 0, "shape": 0, "motion": 0})
    failures: list = field(default_factory=list)

    def add(self, combo: Combo, a: Analysis, seed: int) -> None:
        self.n += 1
        ok = a.matches(combo)
        for k, v in ok.items():
            self.correct[k] += int(v)
        if not all(ok.values()):
            self.failures.append((combo.caption, seed, a.colour, a.shape, a.motion))

    def accuracy(self) -> dict[str, float]:
        return {k: v / self.n if self.n else math.nan for k, v in self.correct.items()}

    def line(self) -> str:
        acc = self.accuracy()
        return f"{self.n} videos: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, motion {acc['motion']:.1%}"


def evaluate(pipe, combos: list[Combo], seeds: list[int], out_dir: str | Path | None = None, **sample_kwargs) -> Scores:
    """Generate every (combo, seed) with ``pipe``, read each video back, score it."""
    from ..video_io import read_video, write_video

    scores = Scores()
    for combo in combos:
        for seed in seeds:
            frames = pipe(prompt=combo.caption, seed=seed, progress=False, **sample_kwargs)
            if out_dir is not None:  # the evaluator reads the written video, as a user would get it
                path = write_video(Path(out_dir) / f"{combo.shape}_{combo.colour}_{combo.motion}_{seed}.mp4", frames, fps=pipe.fps)
                frames, _ = read_video(path)
            scores.add(combo, analyse(frames), seed)
    return scores


__all__ = ["analyse", "evaluate", "Analysis", "Scores", "SHAPES", "MOTIONS"]
