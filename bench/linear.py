"""The transformers' linear layers: vdit_core.layers.linear against F.linear (+ F.gelu), as the
reference implementations compute them, at the shapes of the models' projections.

    python bench/linear.py              # float32 on the CPU, the shapes of bench/cogvideox.py's 5B-style model
    python bench/linear.py --tokens 4096 --dim 1152 --ff 4608   # Open-Sora 1.2-sized rows

Both sides run in one process, their calls alternating (``--rounds``), under ``torch.no_grad``;
prints milliseconds per call (medians) and the time ratio ours/reference for each projection,
and which path ours took (oneDNN on x86 CPUs for products of 2^24 multiply-adds and more).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1090, help="rows per sample (5B-style bench: 864 video + 226 text tokens)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ff", type=int, default=2048, help="the MLP's inner width")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from vdit_core import layers

    d, f, n = args.dim, args.ff, args.tokens
    cases = [  # (name, rows, in, out, gelu)
        ("q/k/v projection", n, d, d, False),
        ("fused qkv (Open-Sora)", n, d, 3 * d, False),
        ("MLP in + GELU", n, d, f, True),
        ("MLP out", n, f, d, False),
        ("CFG pair: MLP in + GELU", 2 * n, d, f, True),
        ("CFG pair: MLP out", 2 * n, f, d, False),
        ("AdaLN modulation (2 rows)", 2, d, 6 * d, False),
    ]
    print(f"{torch.get_num_threads()} threads, float32; oneDNN path available: {layers._ONEDNN}")
    print(f"{'projection':<27} {'rows x in x out':>19} {'ours ms':>9} {'ref ms':>9} {'ratio':>7}  path")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, rows, cin, cout, gelu in cases:
            x, w, b = torch.randn(rows, cin, generator=g), torch.randn(cout, cin, generator=g) / cin**0.5, torch.randn(cout, generator=g)
            fns = {
                "ours": lambda: layers.linear(x, w, b, gelu=gelu),
                "ref": lambda: F.gelu(F.linear(x, w, b), approximate="tanh") if gelu else F.linear(x, w, b),
            }
            diff = (fns["ours"]() - fns["ref"]()).abs().max().item()
            times = {k: [] for k in fns}
            for r in range(args.rounds):
                for k in ("ours", "ref") if r % 2 else ("ref", "ours"):
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            path = "oneDNN" if layers._onednn(x, w) else "F.linear"
            print(f"{name:<27} {f'{rows}x{cin}x{cout}':>19} {med['ours']:>9.2f} {med['ref']:>9.2f} {med['ours'] / med['ref']:>7.3f}  "
                  f"{path} (max diff {diff:.1e})")


if __name__ == "__main__":
    main()
