"""How much memory a device has free, and bytes in words: for refusing requests that cannot fit
before anything is allocated."""

from __future__ import annotations

import torch


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: the driver's free memory plus what PyTorch's
    cache holds unused; CPU: the kernel's MemAvailable), or None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + cached
        except RuntimeError:
            return None
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
