"""What a device offers: how much memory it has free (for refusing requests that cannot fit before
anything is allocated), bytes in words, and the half precision it runs natively."""

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


def bf16_native() -> bool:
    """Whether bfloat16 runs natively where models run: on a CPU, or a CUDA GPU from Ampere on
    (older ones only emulate it, slowly)."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The half precision to encode in on ``device`` (text encoders, VAEs): bfloat16 where it runs
    natively, else float16 (each loader makes float16 safe for its model); float32 on a CPU,
    where half precision is slower."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.bfloat16 if bf16_native() else torch.float16
