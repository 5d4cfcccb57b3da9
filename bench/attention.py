"""Attention backends side by side: time and peak memory of each usable backend against the
plain softmax(QK^T)V reference (``math``), on the same inputs, printed as ratios.

    python bench/attention.py                       # CPU, sizes that finish in a minute
    python bench/attention.py --device cuda --dtype bf16 --seq 17776 --heads 48 --dim 64

Each backend runs in its own subprocess so that peak memory is its own (see ``_harness.py``).
With ``--pad`` the keys carry padding (the text-length masks the models use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, run_worker  # noqa: E402

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def worker(args) -> dict:
    import torch

    from vdit_core.attention import attention

    dtype = getattr(torch, DTYPES[args.dtype])
    device = torch.device(args.device)
    g = torch.Generator("cpu").manual_seed(0)
    shape = (args.batch, args.seq, args.heads, args.dim)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    kv_lens = None
    if args.pad:
        kv_lens = torch.tensor([args.seq - args.pad * (i + 1) // args.batch for i in range(args.batch)], device=device)
    out = {}

    def run():
        out["y"] = attention(q, k, v, kv_lens=kv_lens, backend=args.worker)

    res = measure(run, args.device, repeat=args.repeat)
    if args.worker == "math":
        torch.save(out["y"].float().cpu(), args.ref_out)
        err = 0.0
    else:
        err = float((out["y"].float().cpu() - torch.load(args.ref_out)).abs().max())
    return {"backend": args.worker, "ms": 1000 * res["s"], "peak_mb": res["peak_mib"], "max_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pad", type=int, default=0, help="padded keys in the last sample")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ref-out", default="/tmp/vdit_bench_attention_ref.pt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    from vdit_core.attention import available_backends

    backends = ["math"] + [b for b in available_backends(args.device, getattr(torch, DTYPES[args.dtype])) if b != "math"]
    print(
        f"attention {args.batch}x{args.seq}x{args.heads}x{args.dim} {args.dtype} on {args.device}"
        f"{f', {args.pad} padded keys' if args.pad else ''}; reference: math"
    )
    rows = []
    for b in backends:
        args_list = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker" and v is not None]
        res = run_worker(__file__, ["--worker", b, *args_list])
        if "error" in res:
            print(f"{b:>14}: failed: {res['error']}")
            continue
        rows.append(res)
    ref = rows[0]
    print(f"{'backend':>14} {'ms':>10} {'peak MB':>10} {'time ratio':>11} {'mem ratio':>10} {'max err':>10}")
    for r in rows:
        mem_ratio = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
        print(
            f"{r['backend']:>14} {r['ms']:>10.2f} {r['peak_mb']:>10.1f} {r['ms'] / ref['ms']:>11.3f} "
            f"{mem_ratio:>10.3f} {r['max_err']:>10.2e}"
        )


if __name__ == "__main__":
    main()
