"""The one distributed helper outside the training entry point: who am I, safely.

Answers rank 0 of 1 when no process group exists, so every caller works single-process.
"""

from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0
