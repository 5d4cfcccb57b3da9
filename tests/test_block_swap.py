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


class RecordingCopies:
    """Stands in for the CUDA side stream: copies at once, and logs which ring buffer each copy
    writes, which block it holds, and which copy each compute wait is for."""

    def __init__(self, log: list):
        self.log, self.swap, self.count = log, None, 0

    def _where(self, t: torch.Tensor) -> int:
        return next(k for k, s in enumerate(self.swap.slots) if s.data_ptr() <= t.data_ptr() < s.data_ptr() + max(1, s.numel()))

    def copy(self, dst, src):
        dst.copy_(src)
        self.count += 1
        block = next(i for i, f in enumerate(self.swap.flat) if f.data_ptr() == src.data_ptr())
        self.log.append(("copy", self._where(dst), block, self.count))
        return self.count

    def wait(self, done):
        self.log.append(("wait", done))

    def finish(self):
        self.log.append(("finish",))


def _check_order(log: list) -> None:
    """No copy into a buffer while a block reads it (between its start and the end of its queued
    compute); every block starts from its own copy, waited for."""
    running: dict[int, int] = {}  # slot -> block started from it and not yet ended
    copied: dict[int, tuple[int, int]] = {}  # slot -> (block, copy id) it holds
    waited = set()
    for entry in log:
        if entry[0] == "copy":
            _, slot, block, cid = entry
            assert slot not in running, f"copy of block {block} into buffer {slot} while block {running.get(slot)} reads it"
            copied[slot] = (block, cid)
        elif entry[0] == "wait":
            waited.add(entry[1])
        elif entry[0] == "start":
            _, slot, block = entry
            assert copied[slot][0] == block and copied[slot][1] in waited  # its own copy, waited for
            running[slot] = block
        elif entry[0] == "end":
            running = {s: b for s, b in running.items() if b != entry[1]}


def _recorded_swap(monkeypatch, model, resident):
    log = []
    recorder = RecordingCopies(log)
    monkeypatch.setattr(offload, "copier", lambda device: recorder)
    swap = BlockSwap(model, list(model), "cpu", resident=resident)
    recorder.swap = swap
    for i, b in enumerate(list(model)[resident:]):  # hooks after the swap's: what each block runs from
        b.register_forward_pre_hook(lambda m, a, i=i: log.append(("start", recorder._where(next(m.parameters())), i)))
        b.register_forward_hook(lambda m, a, o, i=i: log.append(("end", i)))
    return swap, log, recorder


def test_copies_go_to_a_ring_of_three_buffers_each_after_the_compute_that_read_it(monkeypatch):
    """However far the CPU runs ahead, the streamed blocks use three device buffers allocated once;
    a copy into a buffer is issued only when no block reading it is between its start and the end
    of its queued compute (the side stream waits for compute queued so far), and every block
    waits for its own copy before running."""
    model = _model(6)
    x = torch.randn(3, 24)
    with torch.no_grad():
        plain = model(x)
    swap, log, recorder = _recorded_swap(monkeypatch, model, resident=1)
    assert len(swap.slots) == 3 and all(s.numel() == max(layout.nbytes for layout in swap.layouts) for s in swap.slots)
    ring = [s.data_ptr() for s in swap.slots]
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), plain)
    assert [s.data_ptr() for s in swap.slots] == ring  # never reallocated
    _check_order(log)
    # each block copied once per run, and the next run's first two ahead of it
    assert sum(e[0] == "start" for e in log) == 3 * 5 and sum(e[0] == "copy" for e in log) == 3 * 5 + 2

    # an interrupted run leaves blocks fetched but not run: the next run still gives the plain output
    boom = list(model)[3].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(x)
    boom.remove()
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    swap.detach()
    assert swap.slots == [] and log[-1] == ("finish",)
    held = {h.data_ptr() for hs in swap.host for h in hs}
    assert all(p.data_ptr() in held for b in list(model)[1:] for p in b.parameters())


@pytest.mark.parametrize("resident", [0, 1])
def test_a_block_brought_for_the_step_caches_signal_keeps_the_ring_in_order(monkeypatch, resident):
    """Step caching runs part of the first block outside its forward (offload.on_device), before
    the block runs, or instead of the whole model on a skipped step. That extra fetch must take a
    free buffer and leave the block ready there: fetching it into the ring's next buffer in turn
    put the third block's copy into the buffer the second was running from (wrong weights)."""
    model = _model(6)
    x = torch.randn(3, 24)
    with torch.no_grad():
        plain = model(x)
    swap, log, _ = _recorded_swap(monkeypatch, model, resident=resident)
    first = swap.streamed[0]
    with torch.no_grad():
        signal = first.norm(x)  # the part of the block the signal runs, with the block at rest
        for skipped in (False, True, True, False, False):
            with offload.on_device(first):
                log.append(("start", _ring_slot(swap, first), 0))
                assert torch.equal(first.norm(x), signal)
                log.append(("end", 0))
            if not skipped:
                assert torch.equal(model(x), plain)
    _check_order(log)
    swap.detach()


def _ring_slot(swap, block) -> int:
    p = next(block.parameters())
    return next(k for k, s in enumerate(swap.slots) if s.data_ptr() <= p.data_ptr() < s.data_ptr() + s.numel())


@pytest.mark.parametrize("streamed", [1, 2])
def test_one_or_two_streamed_blocks(monkeypatch, streamed):
    model = _model(4)
    x = torch.randn(3, 24)
    with torch.no_grad():
        plain = model(x)
    swap, log, _ = _recorded_swap(monkeypatch, model, resident=4 - streamed)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), plain)
    _check_order(log)
    swap.detach()
