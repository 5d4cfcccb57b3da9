"""Step caching (TeaCache-style): skip the transformer's blocks on sampling steps whose input has
changed little since the last step that ran them, reusing that step's residual.

The signal is the first block's timestep-modulated input, which each model computes cheaply. Its
relative L1 change since the previous step accumulates; while the sum stays under ``threshold``,
the blocks are skipped and the tokens get the residual (blocks' output - input) of the last
computed step; once it reaches the threshold the blocks run and the sum restarts. The first step
always runs. ``threshold`` 0 turns caching off; 0.05-0.3 trades quality for speed (bench/step_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class _Branch:
    signal: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    change: float = 0.0


@dataclass
class StepCache:
    """The cache of one sampling run; a model holding one (``transformer.step_cache``) consults it
    in its forward. Conditional and unconditional calls made separately keep separate states,
    told apart by their conditioning (``key``)."""

    threshold: float
    computed: int = 0
    skipped: int = 0
    _branches: dict = field(default_factory=dict)

    def run(self, key, tokens: torch.Tensor, signal: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``blocks(tokens)``, or ``tokens`` + the last computed residual when the signal has
        changed by less than the threshold (summed over the steps skipped since)."""
        br = self._branches.setdefault((tuple(tokens.shape), key), _Branch())
        if br.signal is not None and br.residual is not None:
            br.change += float((signal - br.signal).abs().mean() / br.signal.abs().mean().clamp(min=1e-12))
            if br.change < self.threshold:
                br.signal = signal
                self.skipped += 1
                return tokens + br.residual
        br.signal, br.change = signal, 0.0
        out = blocks(tokens)
        br.residual = out - tokens
        self.computed += 1
        return out


def run_blocks(cache: StepCache | None, tokens: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor],
               signal: Callable[[], torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
    """A model's blocks on ``tokens``: directly without a cache, else through it, with ``signal()``
    (the first block's modulated input) and the branch told apart by its conditioning ``cond``
    (the same prompt gives the same sum every step)."""
    if cache is None:
        return blocks(tokens)
    return cache.run(float(cond.float().sum()), tokens, signal(), blocks)
