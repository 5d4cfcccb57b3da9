"""A 3D convolution that is causal in time and takes its temporal context explicitly.

``CausalConv3d.forward(x, cache) -> (y, new_cache)``: ``cache`` holds the last ``k_t - 1`` input
frames of the previous chunk (``None`` for the first chunk, which is padded by repeating its first
frame). Feeding a long video chunk by chunk with the returned cache gives the same result as one
call on the whole video, in memory bounded by the chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# convolutions run over slices of output frames whose inputs hold at most this many elements: the
# padded video is never built, and the convolution's own buffers (oneDNN's reordered copies on
# CPU, workspaces on GPU) stay the size of a slice (64 MiB in float32); it also keeps cuDNN under
# its 32-bit indexing limit
SLICE_ELEMENTS = 2**24


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
            return (pointwise(self.conv, x) if self.conv.kernel_size == (1, 1, 1) else self.conv(x)), None
        k = self.kt - 1
        prev = (cache if cache is not None else x[:, :, :1].expand(-1, -1, k, -1, -1)).to(x.dtype)
        t = x.shape[2]
        new_cache = (torch.cat([prev, x], dim=2) if t < k else x)[:, :, -k:].clone()
        step = max(1, SLICE_ELEMENTS // (x[:, :, :1].numel()) - k)  # output frames per slice
        out = None
        for s in range(0, t, step):
            e = min(t, s + step)
            # the k frames before output frame s, then its own: from the cache while s < k
            y = self.conv(torch.cat([prev[:, :, s:], x[:, :, :e]], dim=2) if s < k else x[:, :, s - k : e])
            if e == t and s == 0:
                return y, new_cache
            if out is None:
                out = y.new_empty(*y.shape[:2], t, *y.shape[3:])
            out[:, :, s:e] = y
            del y
        return out, new_cache


def pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 ``Conv3d`` as one matrix product over channels: [B, C, T, H, W] -> [B, C_out, T, H, W].
    (PyTorch's CPU conv3d runs these through a slow path that first copies the input into an
    im2col buffer.)"""
    b, c = x.shape[:2]
    out = torch.matmul(conv.weight.view(conv.out_channels, c), x.reshape(b, c, -1))  # [B, C_out, T*H*W]
    if conv.bias is not None:
        out += conv.bias[:, None]
    return out.view(b, conv.out_channels, *x.shape[2:])
