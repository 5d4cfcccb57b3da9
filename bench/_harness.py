"""Shared by the benchmarks: run a case in a fresh subprocess and measure its time and peak memory.

Peak memory is the case's own: on CUDA the allocator's ``max_memory_allocated`` above what was
allocated before the first call; on CPU the process's peak RSS above its RSS before the first call,
with the peak reset there (Linux ``/proc/self/clear_refs``), so that a load that briefly held two
copies of the weights does not hide the case's own peak (elsewhere the growth of ``ru_maxrss``, a
high-water mark from process start).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def measure(fn: Callable[[], object], device: str, repeat: int = 3, warmup: int = 1) -> dict:
    """Median seconds of ``fn`` and its peak memory in MiB (first call included)."""
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    return {"s": sorted(times)[len(times) // 2], "peak_mib": peak / 2**20}


def _status(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """The current RSS with the peak reset to it (Linux), else the peak since process start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(script: str, args: list[str], launcher: tuple[str, ...] = ()) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter (under ``launcher``'s module, e.g.
    ``("-m", "torch.distributed.run", "--nproc_per_node", "2")``); its last JSON line is the result."""
    res = subprocess.run([sys.executable, *launcher, script, *args], capture_output=True, text=True)
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "n/a"


def weights_once(name: str, size: str, spec: dict, make: Callable[[Path, dict], None]) -> Path:
    """The folder of a benchmark's random weights for ``spec``: made by ``make(root, spec)`` (seed
    0) the first time, reused after."""
    import torch

    root = weights_root(name, size, spec)
    if not (root / "done").exists():
        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        make(root, spec)
        (root / "done").write_text("ok")
    return root


def weights_root(name: str, size: str, spec: dict) -> Path:
    """Where a benchmark keeps the random weights it made for ``spec`` (made once, reused)."""
    import hashlib
    import tempfile

    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"vdit_bench_{name}_{size}_{key}"



def bench_args(description: str, sizes, dtypes):
    """The options every benchmark takes (and its hidden worker options); add your own to it."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(sizes))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(dtypes))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3, help="interleaved runs of each side per case (medians reported)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    return p


def interleaved(script: str, common: list[str], case: str, impls: tuple[str, ...], pairs: int) -> dict[str, dict] | str:
    """Run ``case.format(impl)`` for each impl, ``pairs`` rounds interleaved, each in a fresh
    process: the median of each measured figure per impl, or the first error's text."""
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(pairs):
        for impl in impls:
            res = run_worker(script, [*common, "--worker", case.format(impl)])
            if "error" in res:
                return f"{impl} failed: {res['error']}"
            runs[impl].append(res)
    out = {}
    for impl, rs in runs.items():
        keys = [k for k, v in rs[0].items() if isinstance(v, (int, float))]
        out[impl] = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in keys}
        out[impl]["s_min"] = min(r["s"] for r in rs)  # the fastest run
    return out
