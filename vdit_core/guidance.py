"""Classifier-free guidance as a denoiser wrapper."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .sampling import noise_form


def _can_batch(cond: dict, uncond: dict) -> bool:
    """Both branches carry the same keys and batch-concatenable values."""
    if cond.keys() != uncond.keys():
        return False
    for k, a in cond.items():
        b = uncond[k]
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                return False
        elif a != b:
            return False
    return True


def _cat(a, b):
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a


class CFGDenoiser:
    """``x0 = x0_uncond + scale * (x0_cond - x0_uncond)``.

    Guiding the x0 estimate is the same as guiding eps or v: all three are affine in the network
    output with the same coefficients for both branches.

    Args:
        model: the denoiser, ``model(x, sigma, **cond) -> x0``.
        scale: guidance scale, or a function of sigma [B] -> float (dynamic CFG).
        batched: run both branches in one forward pass (one call of batch 2B). On a CUDA
            out-of-memory error it falls back to two passes for the rest of the run.
        agree: where several ranks run this together (sequence parallel: the forward passes
            exchange data, so every rank must make the same calls), ``agree(failed, device)``
            tells whether any rank ran out of memory; all fall back together.

    Called as ``denoiser(x, sigma, cond={...}, uncond={...})``: pass those two dicts as a
    sampler's ``extra_args``. ``uncond=None`` or a scale of 1 skips the unconditional pass.
    """

    def __init__(self, model, scale: float | Callable[[torch.Tensor], float], batched: bool = True,
                 agree: Callable[[bool, torch.device], bool] | None = None):
        self.model = model
        self.scale = scale
        self.batched = batched
        self.agree = agree
        self.noise_form = noise_form(model)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None = None) -> torch.Tensor:
        scale = self.scale(sigma) if callable(self.scale) else self.scale
        if uncond is None or scale == 1.0:
            return self.model(x, sigma, **cond)
        if self.batched and _can_batch(cond, uncond):
            failed = False
            try:
                both = self.model(
                    torch.cat([x, x]), torch.cat([sigma, sigma]), **{k: _cat(cond[k], uncond[k]) for k in cond}
                )
            except torch.OutOfMemoryError:
                failed = True
            if self.agree is not None:  # a rank alone in the batched pass would wait forever in its exchanges
                failed = self.agree(failed, x.device)
            if not failed:
                x0_cond, x0_uncond = both.chunk(2)
                return x0_uncond + scale * (x0_cond - x0_uncond)
            # two passes from now on; the cache is emptied only here, once the failed pass's
            # tensors (held by the exception's traceback inside the except block) are freed
            both = None
            self.batched = False
            if x.is_cuda:
                torch.cuda.empty_cache()
        x0_cond = self.model(x, sigma, **cond)
        x0_uncond = self.model(x, sigma, **uncond)
        return x0_uncond + scale * (x0_cond - x0_uncond)


def cogvideox_dynamic_cfg(scale: float, num_steps: int, timestep: Callable[[torch.Tensor], torch.Tensor]):
    """CogVideoX's dynamic CFG: ``w = 1 + scale * (1 - cos(pi * ((N - t) / N) ** 5)) / 2``.

    ``t`` is the discrete timestep (0..999) and ``N`` the number of steps, exactly as the official
    SAT code and diffusers' CogVideoX pipelines compute it (they pass the raw timestep where a
    step index looks intended; the formula is kept so outputs match the released behaviour).
    """

    def fn(sigma: torch.Tensor) -> float:
        t = float(timestep(sigma.reshape(-1)[:1].cpu())[0].round())
        return 1 + scale * (1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2

    return fn
