"""Measuring what a demo video shows: the moving object's colour, shape and direction.

* colour: the mean colour of the object's pixels, nearest of the six palette colours;
* shape: which ideal shape (circle, square, upward triangle) of the object's area, centred on its
  centroid, overlaps it best (mean IoU over the frames): unlike the share of its bounding box it
  fills (also reported), this holds for blurred shapes (checked on ground truth blurred with
  sigmas up to 2.5 px: 100%);
* motion: the sign of the larger axis of the centroid track's least-squares slope.

The shape's margin is the asked shape's overlap minus the best other shape's: its distance from
the decision boundary (negative: read as another shape). Rendered squares score about 0.16
(their nearest rival is the circle), circles 0.16, triangles 0.29.

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
    overlap: dict = field(default_factory=dict)  # shape -> mean IoU with its ideal template

    def margin(self, shape: str) -> float:
        """``shape``'s overlap minus the best other shape's (NaN when nothing was measured)."""
        if not self.overlap:
            return math.nan
        return self.overlap[shape] - max(v for s, v in self.overlap.items() if s != shape)

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
    overlap = {s: v / len(visible) for s, v in overlap.items()}
    shape = max(overlap, key=overlap.get)
    tt = torch.tensor(visible, dtype=torch.float32)
    tt = tt - tt.mean()
    sx = float((tt * (torch.tensor(cx) - sum(cx) / len(cx))).sum() / (tt * tt).sum())
    sy = float((tt * (torch.tensor(cy) - sum(cy) / len(cy))).sum() / (tt * tt).sum())
    if abs(sx) >= abs(sy):
        motion = "right" if sx > 0 else "left"
    else:
        motion = "down" if sy > 0 else "up"
    return Analysis(colour, shape, motion, fill, (sx, sy), len(visible), overlap)


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
    """Per-attribute accuracy over a set of videos, and each video's shape margin."""

    n: int = 0
    correct: dict = field(default_factory=lambda: {"colour": 0, "shape": 0, "motion": 0})
    failures: list = field(default_factory=list)
    margins: list = field(default_factory=list)  # (combo, seed, shape margin)

    def add(self, combo: Combo, a: Analysis, seed: int) -> None:
        self.n += 1
        ok = a.matches(combo)
        for k, v in ok.items():
            self.correct[k] += int(v)
        self.margins.append((combo, seed, a.margin(combo.shape)))
        if not all(ok.values()):
            self.failures.append((combo.caption, seed, a.colour, a.shape, a.motion))

    def accuracy(self) -> dict[str, float]:
        return {k: v / self.n if self.n else math.nan for k, v in self.correct.items()}

    def margin(self, shape: str | None = None, colour: str | None = None) -> dict[str, float]:
        """Mean, median and minimum shape margin (NaN margins, nothing measured, count as -1),
        over the videos of ``shape`` and ``colour`` (None: all)."""
        m = sorted(-1.0 if math.isnan(v) else v for c, _, v in self.margins
                   if shape in (None, c.shape) and colour in (None, c.colour))
        if not m:
            return {"mean": math.nan, "median": math.nan, "min": math.nan}
        return {"mean": sum(m) / len(m), "median": m[len(m) // 2], "min": m[0]}

    def line(self) -> str:
        acc, mg = self.accuracy(), self.margin()
        return (f"{self.n} videos: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}, motion {acc['motion']:.1%}; "
                f"shape margin mean {mg['mean']:.3f}, min {mg['min']:.3f}")

    def table(self) -> str:
        """Shape margins (mean / min) and shape accuracy per shape and colour."""
        rows = []
        for shape in SHAPES:
            cells = []
            for colour in COLOURS:
                vids = [(v, c) for c, _, v in self.margins if c.shape == shape and c.colour == colour]
                if vids:
                    mg = self.margin(shape, colour)
                    right = sum(1 for v, _ in vids if v > 0)
                    cells.append(f"{colour} {right}/{len(vids)} {mg['mean']:+.3f}/{mg['min']:+.3f}")
            if cells:
                mg = self.margin(shape)
                rows.append(f"  {shape:8s} mean {mg['mean']:+.3f} min {mg['min']:+.3f} | " + ", ".join(cells))
        return "\n".join(rows)

    def summary(self) -> dict:
        """A JSON-ready summary."""
        return {"videos": self.n, **{k: round(v, 4) for k, v in self.accuracy().items()},
                "shape_margin": {k: round(v, 4) for k, v in self.margin().items()},
                "shape_margin_by_shape": {s: {k: round(v, 4) for k, v in self.margin(s).items()} for s in SHAPES
                                          if any(c.shape == s for c, _, _ in self.margins)},
                "failures": self.failures}


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


def evaluate_cli(model: str | Path | None, combos: list[Combo], seeds: list[int], out_dir: str | Path, *cli_args: str) -> Scores:
    """Every (combo, seed) through ``python -m vdit_core.generate`` (in process: the same
    argument parsing, loading and writing), each video read back from its mp4 file."""
    from ..generate import main as generate
    from ..video_io import read_video

    scores = Scores()
    for combo in combos:
        for seed in seeds:
            path = Path(out_dir) / f"{combo.shape}_{combo.colour}_{combo.motion}_{seed}.mp4"
            argv = ["--prompt", combo.caption, "--seed", str(seed), "--out", str(path), "--overwrite", *cli_args]
            if generate(argv + (["--model", str(model)] if model is not None else [])) != 0:
                raise RuntimeError(f"generate failed: {' '.join(argv)}")
            scores.add(combo, analyse(read_video(path)[0]), seed)
    return scores


def ground_truth_clips(combos: list[Combo], seeds: list[int]) -> list[tuple[Combo, int, torch.Tensor]]:
    """A rendered clip per (combo, seed): the same clip for the same pair, whatever else is asked."""
    import random

    from .shapes import render

    return [(c, s, render(c, random.Random(f"{c.caption}/{s}"))) for c in combos for s in seeds]


@torch.no_grad()
def stage_scores(pipe, clips: list[tuple[Combo, int, torch.Tensor]], denoise: float = 0.6) -> dict[str, Scores]:
    """Each stage of the model on its own, on rendered clips:

    * ``rendered``: the clips themselves (the evaluator's own ceiling);
    * ``vae``: the VAE's round trip (encode, decode), no transformer;
    * ``transformer_from_truth``: the clip's latents noised to ``denoise`` and sampled back with
      its caption (video-to-video), then decoded: the transformer given ground-truth layout.
    """
    out = {k: Scores() for k in ("rendered", "vae", "transformer_from_truth")}
    for combo, seed, frames in clips:
        out["rendered"].add(combo, analyse(frames), seed)
        video = frames.permute(3, 0, 1, 2)[None].to(pipe.device, pipe.vae.dtype) * 2 - 1
        rec = pipe.vae.decode(pipe.vae.encode(video))[0].permute(1, 2, 3, 0).float().cpu()
        out["vae"].add(combo, analyse((rec / 2 + 0.5).clamp(0, 1)), seed)
        v2v = pipe(prompt=combo.caption, seed=seed, video=frames, denoise=denoise, progress=False)
        out["transformer_from_truth"].add(combo, analyse(v2v.float().cpu()), seed)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile
    import time

    from . import MODEL_DIR
    from .shapes import held_out_combos, train_combos

    p = argparse.ArgumentParser(prog="python -m vdit_core.demo.evaluate",
                                description="Colour, shape and motion accuracy of the demo model, with shape margins.")
    p.add_argument("--model", default=None, help="model folder (default: the bundled demo)")
    p.add_argument("--prompts", choices=["held_out", "train"], default="held_out",
                   help="the held-out prompts (never trained) or the training prompts")
    p.add_argument("--split-seed", type=int, default=0, help="the dataset seed that chose the held-out prompts")
    p.add_argument("--seeds", type=int, default=10, help="sampling seeds per prompt (0..N-1)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--step-cache", type=float, default=0.0)
    p.add_argument("--cli", action="store_true", help="generate through python -m vdit_core.generate (in process)")
    p.add_argument("--stages", action="store_true", help="also each stage on its own: rendered clips, VAE round trip, "
                   "the transformer from noised ground-truth latents")
    p.add_argument("--denoise", type=float, default=0.6, help="--stages: how much of the run the transformer redoes")
    p.add_argument("--out", default=None, help="folder for the videos (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    combos = held_out_combos(args.split_seed) if args.prompts == "held_out" else train_combos(args.split_seed)
    seeds = list(range(args.seeds))
    model = Path(args.model) if args.model else MODEL_DIR
    report = {"model": str(model), "prompts": args.prompts, "seeds": args.seeds, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "step_cache": args.step_cache, "via": "cli" if args.cli else "pipeline"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.cli:
            cli_args = ["--dtype", args.dtype, "--step-cache", str(args.step_cache)]
            scores = evaluate_cli(args.model, combos, seeds, out, *cli_args)
        else:
            from ..pipeline import load_pipeline

            pipe = load_pipeline(model, device="cpu", dtype=args.dtype)
            scores = evaluate(pipe, combos, seeds, out_dir=out, step_cache=args.step_cache)
        report["seconds_per_video"] = round((time.perf_counter() - t0) / scores.n, 2)
    print(f"{args.prompts} prompts ({report['via']}, {args.dtype}, {report['threads']} threads, step cache {args.step_cache}): "
          f"{scores.line()}; {report['seconds_per_video']} s per video")
    print(scores.table())
    report["generated"] = scores.summary()
    if args.stages:
        from ..pipeline import load_pipeline

        pipe = load_pipeline(model, device="cpu", dtype=args.dtype)
        for name, st in stage_scores(pipe, ground_truth_clips(combos, seeds), args.denoise).items():
            print(f"stage {name}: {st.line()}")
            print(st.table())
            report[name] = st.summary()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["analyse", "evaluate", "evaluate_cli", "stage_scores", "ground_truth_clips", "Analysis", "Scores", "SHAPES", "MOTIONS"]
