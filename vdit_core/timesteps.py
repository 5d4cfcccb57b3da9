"""Timestep samplers for training.

Discrete models draw integer timesteps in [0, T); flow models draw sigmas in (0, 1). Convert
with ``schedule.sigma(t)`` before calling a denoiser's ``loss``.
"""

from __future__ import annotations

import torch

from .schedules import time_shift


def uniform_timesteps(batch: int, num_timesteps: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` integer timesteps drawn uniformly from [0, T)."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator)


def stratified_bands(num_timesteps: int, num_bands: int) -> list[tuple[int, int]]:
    """Split [0, T) into ``num_bands`` contiguous half-open bands that cover it exactly once."""
    if not 1 <= num_bands <= num_timesteps:
        raise ValueError(f"need 1 <= bands <= {num_timesteps}, got {num_bands}")
    edges = [(k * num_timesteps) // num_bands for k in range(num_bands + 1)]
    return [(edges[k], edges[k + 1]) for k in range(num_bands)]


def stratified_timesteps(
    batch: int,
    num_timesteps: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CogVideoX's "parallel uniform sampling", extended to per-rank batches.

    [0, T) is split into ``world_size * batch`` bands; rank ``r`` draws sample ``j`` from band
    ``r * batch + j``, so each rank owns one contiguous stretch and the global batch covers the
    whole range every step. Works unchanged with one process (``rank=0, world_size=1``).
    Unlike the SAT code no index is ever unreachable when T is not a multiple of the band count.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    bands = stratified_bands(num_timesteps, world_size * batch)[rank * batch : (rank + 1) * batch]
    lo = torch.tensor([b[0] for b in bands])
    width = torch.tensor([b[1] - b[0] for b in bands])
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return lo + (u * width).floor().long().clamp(max=width - 1)


def logit_normal_sigmas(
    batch: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flow sigmas ``sigmoid(mean + std * N(0, 1))`` (SD3, Open-Sora), then an SD3/Open-Sora shift."""
    z = torch.randn(batch, generator=generator, dtype=torch.float64) * std + mean
    return time_shift(torch.sigmoid(z), shift)
