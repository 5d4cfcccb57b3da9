"""Block swap: run a transformer larger than the GPU's memory by keeping only some of its blocks
there and streaming the rest from (pinned) CPU memory, one block ahead, on a side stream.

The first ``resident`` blocks and everything outside the blocks (embeddings, output layers) live
on the device. Each streamed block's weights stay in CPU memory; just before the block runs its
copy is waited for and the next streamed block's copy starts, so the transfer overlaps compute;
right after it runs its device copy is dropped. At most two streamed blocks are in use on the device at
once (a third may wait to be freed until the GPU is past it). The output is the plain run's
exactly: the same weights, the same operations.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable

import torch
import torch.nn as nn


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


_STREAMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # streamed block -> (its BlockSwap, its index)


def on_device(block: nn.Module):
    """A context in which ``block``'s weights are on the device, also when block swap streams it
    (then they are brought as before the block runs, and dropped after). For a part of a block
    called outside the block's own forward, whose hooks bring them otherwise: step caching's
    signal, the first block's modulated input, with ``gpu_blocks=0``."""
    streamed = _STREAMED.get(block)
    return streamed[0]._on_device(streamed[1]) if streamed is not None else contextlib.nullcontext()


class BlockSwap:
    """Streams ``blocks[resident:]`` of ``model`` to ``device`` as they run (see the module doc);
    the rest of ``model`` is moved to ``device``. Generation only (no gradients through the swap).
    :meth:`detach` stops streaming, leaving the streamed blocks in CPU memory."""

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str, resident: int):
        blocks = list(blocks)
        if not 0 <= resident <= len(blocks):
            raise ValueError(f"gpu_blocks={resident}: the model has {len(blocks)} blocks; use 0..{len(blocks)}")
        self.device = torch.device(device)
        self.streamed = blocks[resident:]
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        streamed_ids = {id(t) for b in self.streamed for t in _tensors(b)}
        # everything not streamed moves to the device, one tensor at a time (no full-model peak)
        for t in _tensors(model):
            if id(t) not in streamed_ids:
                t.data = t.data.to(self.device)
        # the streamed blocks' weights: in CPU memory, pinned so copies can run asynchronously
        self.host: list[list[torch.Tensor]] = []
        for b in self.streamed:
            held = []
            for t in _tensors(b):
                h = t.data.to("cpu")
                if cuda:
                    h = h.pin_memory()
                t.data = h
                held.append(h)
            self.host.append(held)
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._handles = []
        for i, b in enumerate(self.streamed):
            self._handles.append(b.register_forward_pre_hook(self._before(i)))
            self._handles.append(b.register_forward_hook(self._after(i)))
            _STREAMED[b] = (self, i)

    def _fetch(self, i: int) -> None:
        """Start copying streamed block ``i`` to the device (on the side stream)."""
        if i in self._pending:
            return
        if self.stream is None:  # no streams (CPU): a plain copy
            self._pending[i] = ([h.to(self.device, copy=True) for h in self.host[i]], None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory it reuses is free
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in self.host[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self._pending[i] = (copies, done)

    def _before(self, i: int):
        def hook(module, args):
            self._fetch(i)
            copies, done = self._pending.pop(i)
            if done is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                for c in copies:  # used on the compute stream: not reused before that work is done
                    c.record_stream(current)
            for t, c in zip(_tensors(module), copies):
                t.data = c
            self._fetch((i + 1) % len(self.streamed))  # the next one overlaps this block's compute

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            for t, h in zip(_tensors(module), self.host[i]):
                t.data = h  # the device copy is freed once the compute stream is past it

        return hook

    @contextlib.contextmanager
    def _on_device(self, i: int):
        block = self.streamed[i]
        self._before(i)(block, ())
        try:
            yield
        finally:
            self._after(i)(block, (), None)

    def detach(self) -> None:
        """Stop streaming: the streamed blocks stay in CPU memory (move the model where wanted)."""
        for b in self.streamed:
            _STREAMED.pop(b, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()


def check_block_swap(device: torch.device | str, gpu_blocks: int | None) -> None:
    """Refuse block swap where it means nothing: off a CUDA device, or a negative count."""
    if gpu_blocks is None:
        return
    if isinstance(gpu_blocks, bool) or not isinstance(gpu_blocks, int) or gpu_blocks < 0:
        raise ValueError(f"gpu_blocks={gpu_blocks!r}: the number of transformer blocks kept on the GPU must be a whole number >= 0 "
                         "(0 streams every block; leave it unset to keep the whole model on the GPU)")
    if torch.device(device).type != "cuda":
        raise ValueError(f"gpu_blocks={gpu_blocks}: block swap streams blocks from CPU memory to a CUDA GPU; the device is "
                         f"{torch.device(device).type} (leave it unset)")


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def blocks_that_fit(model: nn.Module, blocks: Iterable[nn.Module], free: int, reserve: int) -> int | None:
    """How many blocks to keep on a device with ``free`` bytes when ``reserve`` bytes must stay
    free for activations: None when the whole model fits, else the largest count that leaves room
    for the rest of the model and three streamed blocks (the one running, the next one arriving,
    and the last one, whose memory returns once the GPU is done with it), 0 at the least."""
    sizes = [module_bytes(b) for b in blocks]
    total = module_bytes(model)
    if total + reserve <= free:
        return None
    room = free - reserve - (total - sum(sizes)) - 3 * max(sizes, default=0)
    kept = 0
    for s in sizes:
        if room < s:
            break
        room -= s
        kept += 1
    return kept
