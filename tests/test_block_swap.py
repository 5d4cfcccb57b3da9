"""Block swap's GPU-only parts, run on a CPU (vdit_core.offload): the page-locked CPU copies
(registration recorded instead of made) and the copy/compute ordering on the streams (a fake
copier records what a CUDA stream pair would be asked)."""

from __future__ import annotations

import mmap

import pytest
import torch
import torch.nn as nn

from vdit_core import families, offload
from vdit_core.offload import ALIGN, BlockSwap, FlatLayout, module_bytes


class Block(nn.Module):
    """Tensors of several dtypes and shapes, as a transformer block holds (a float8 weight with its
    float32 scale, a 0-d buffer, an odd-sized bias)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(24, 24)
        self.norm = nn.LayerNorm(24)
        self.weight8 = nn.Parameter(torch.randn(24, 24, generator=g).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("scale", torch.rand((), generator=g))
        self.odd = nn.Parameter(torch.randn(7, generator=g))
        with torch.no_grad():
            for p in (*self.proj.parameters(), *self.norm.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        w = self.weight8.float() * self.scale
        return self.norm(x + torch.tanh(self.proj(x) @ w)) + self.odd.sum()


def _model(n: int = 5) -> nn.Sequential:
    return nn.Sequential(*[Block(i) for i in range(n)]).eval()


def test_streamed_blocks_are_one_flat_exactly_page_locked_buffer_each(monkeypatch):
    locked = []
    monkeypatch.setattr(offload, "page_lock", lambda buffer, nbytes: locked.append((buffer.data_ptr(), nbytes)) or True)
    model = _model()
    x = torch.randn(3, 24)
    with torch.no_grad():
        plain = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = BlockSwap(model, list(model), "cpu", resident=1, pin=True)
    streamed = list(model)[1:]
    assert len(locked) == len(streamed)  # one registration per block, not one per tensor
    for block, flat, layout, (ptr, nbytes) in zip(streamed, swap.flat, swap.layouts, locked):
        ts = [*block.parameters(), *block.buffers()]
        assert {t.untyped_storage().data_ptr() for t in ts} == {flat.untyped_storage().data_ptr()}  # views of one buffer
        assert ptr == flat.data_ptr() and ptr % mmap.PAGESIZE == 0  # whole pages, of this buffer only
        assert layout.nbytes <= nbytes < layout.nbytes + mmap.PAGESIZE  # its size, not the next power of two
        assert all((t.data_ptr() - ptr) % ALIGN == 0 for t in ts)
        assert sum(t.numel() * t.element_size() for t in ts) <= layout.nbytes < module_bytes(block) + ALIGN * len(ts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the same values, now in the buffers
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    swap.detach()


def test_flat_buffers_cost_no_more_than_the_weights_of_a_real_model():
    """CogVideoX-5B's blocks (built on the meta device): the flat buffers add under 0.1% to the
    streamed weights (pinning tensor by tensor through torch's allocator rounds each to a power of
    two: 1.78x of 10.3 GiB in bf16)."""
    from vdit_core.models import cogvideox

    with torch.device("meta"):
        model = cogvideox.CogVideoXTransformer(cogvideox.PRESETS["cogvideox-5b"]).to(torch.bfloat16)
    blocks = list(families.get("cogvideox").blocks(model))
    flat = sum(FlatLayout.of([*b.parameters(), *b.buffers()]).nbytes for b in blocks)
    weights = sum(module_bytes(b) for b in blocks)
    assert weights > 10 * 2**30 and flat / weights < 1.001


def test_memory_that_cannot_be_page_locked_is_streamed_from_pageable_memory(monkeypatch):
    monkeypatch.setattr(offload, "page_lock", lambda buffer, nbytes: False)
    model = _model(3)
    x = torch.randn(2, 24)
    with torch.no_grad():
        plain = model(x)
    with pytest.warns(UserWarning, match=r"block swap: \d+ MiB of CPU memory could not be page-locked"):
        swap = BlockSwap(model, list(model), "cpu", resident=0, pin=True)
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    swap.detach()
