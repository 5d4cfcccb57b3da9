"""A 3D convolution that is causal in time and takes its temporal context explicitly.

``CausalConv3d.forward(x, cache) -> (y, new_cache)``: ``cache`` holds the last ``k_t - 1`` input
frames of the previous chunk (``None`` for the first chunk, which is padded by repeating its first
frame). Feeding a long video chunk by chunk with the returned cache gives the same result as one
call on the whole video, in memory bounded by the chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# inputs above this many elements are convolved in overlapping time slices (cuDNN's 32-bit
# indexing limit, and peak memory)
_MAX_ELEMENTS = 2**30


class CausalConv3d(nn.Module):
    """Conv3d (stride 1) with causal time padding; spatial padding keeps H and W (odd kernels)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.kt = kt
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [B, C, T, H, W] -> [B, C_out, T, H, W]
        if self.kt == 1:
            return self.conv(x), None
        prev = cache if cache is not None else x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
        x = torch.cat([prev.to(x.dtype), x], dim=2)
        new_cache = x[:, :, -(self.kt - 1):].clone()  # a copy, so the padded input can be freed
        return self._conv(x), new_cache

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= _MAX_ELEMENTS or x.shape[2] <= self.kt:
            return self.conv(x)
        # slices of output frames, each with the k_t - 1 input frames it needs before it
        per_frame = x.numel() // x.shape[2]
        step = max(1, _MAX_ELEMENTS // per_frame - (self.kt - 1))
        outs = []
        n_out = x.shape[2] - (self.kt - 1)
        for start in range(0, n_out, step):
            stop = min(n_out, start + step)
            outs.append(self.conv(x[:, :, start : stop + self.kt - 1]))
        return torch.cat(outs, dim=2)
