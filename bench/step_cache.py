"""Step caching (and fp8 weights) on the bundled demo: speed-up and quality, in one run.

    python bench/step_cache.py                      # 72 videos per threshold (every combo, 1 seed)
    python bench/step_cache.py --thresholds 0,0.1,0.2,0.4 --seeds 0,1
    python bench/step_cache.py --thresholds 0 --fp8  # fp8 weights against the plain run

For each threshold: seconds per video (median over the videos), how many transformer calls ran
and were skipped, the frames' PSNR against the uncached videos (same seeds), and the demo
evaluator's accuracy (colour, shape, motion) next to the uncached run's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    import torch

    from vdit_core import load_pipeline
    from vdit_core.demo import demo_model_path
    from vdit_core.demo.evaluate import Scores, analyse
    from vdit_core.demo.shapes import ALL_COMBOS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thresholds", default="0,0.08,0.1,0.15")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--fp8", action="store_true", help="then the same with the blocks' weights in float8 (a row 'fp8')")
    args = p.parse_args()
    pipe = load_pipeline(demo_model_path(), device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(c, s) for c in ALL_COMBOS for s in seeds]
    print(f"demo, {len(jobs)} videos per threshold, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'threshold':>9} {'s/video':>8} {'speed-up':>8} {'computed':>9} {'skipped':>8} {'PSNR dB':>8}  accuracy (colour, shape, motion)")
    reference, base_s = None, None
    rows = [(float(t), pipe) for t in args.thresholds.split(",")]
    if args.fp8:
        rows.append((0.0, load_pipeline(demo_model_path(), device="cpu", fp8=True)))
    for th, pipe in rows:
        label = "fp8" if pipe is not rows[0][1] else th
        videos, times, computed, skipped, scores = [], [], 0, 0, Scores()
        for combo, seed in jobs:
            t0 = time.perf_counter()
            frames = pipe(prompt=combo.caption, seed=seed, steps=args.steps, progress=False, step_cache=th)
            times.append(time.perf_counter() - t0)
            if pipe.last_step_cache is not None:
                computed, skipped = computed + pipe.last_step_cache.computed, skipped + pipe.last_step_cache.skipped
            videos.append(frames)
            scores.add(combo, analyse(frames), seed)
        s = sorted(times)[len(times) // 2]
        if reference is None:
            reference, base_s = videos, s
            psnr = "-"
        else:
            mse = torch.stack([((a - b) ** 2).mean() for a, b in zip(videos, reference)]).mean().item()
            psnr = f"{10 * math.log10(1 / mse):.1f}" if mse > 0 else "inf"
        acc = scores.accuracy()
        calls = f"{computed:>9} {skipped:>8}" if th > 0 else f"{'all':>9} {0:>8}"
        print(f"{label:>9} {s:>8.3f} {base_s / s:>8.2f} {calls} {psnr:>8}  {acc['colour']:.1%}, {acc['shape']:.1%}, {acc['motion']:.1%}")


if __name__ == "__main__":
    main()
