"""Block swap: run a transformer larger than the GPU's memory by keeping only some of its blocks
there and streaming the rest from (pinned) CPU memory, one block ahead, on a side stream.

The first ``resident`` blocks and everything outside the blocks (embeddings, output layers) live
on the device. Each streamed block's weights stay in CPU memory; just before the block runs its
copy is waited for and the next streamed block's copy starts, so the transfer overlaps compute;
right after it runs its device copy is dropped. At most two streamed blocks are in use on the device at
once (a third may wait to be freed until the GPU is past it). The output is the plain run's
exactly: the same weights, the same operations.

In CPU memory each streamed block is one flat byte buffer, its parameters views into it, page-
locked as a whole with exactly its size: torch's pinned allocator rounds every allocation up to a
power of two, which pinning tensor by tensor turns into 1.5-1.8x the streamed weights (CogVideoX-5B
in bf16: 10.3 GiB streamed, 18.4 GiB pinned), and page-locked memory is scarce (Windows allows
about half the RAM).
"""

from __future__ import annotations

import mmap
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

ALIGN = 256  # bytes: where each tensor of a flat buffer starts (vectorised CUDA kernels and float8 matmuls need 16)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclass(frozen=True)
class FlatLayout:
    """Where each of a block's tensors lies in its flat byte buffer: ``offsets`` (multiples of
    :data:`ALIGN`) and the buffer's size ``nbytes``."""

    offsets: tuple[int, ...]
    nbytes: int

    @staticmethod
    def of(tensors: list[torch.Tensor]) -> "FlatLayout":
        offsets, end = [], 0
        for t in tensors:
            end = -(-end // ALIGN) * ALIGN
            offsets.append(end)
            end += t.numel() * t.element_size()
        return FlatLayout(tuple(offsets), end)

    def views(self, buffer: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the uint8 ``buffer`` shaped and typed as ``tensors``, at their offsets."""
        return [buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(self.offsets, tensors)]


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def page_lock(buffer: torch.Tensor, nbytes: int) -> bool:
    """Page-lock ``nbytes`` of CPU memory from where the uint8 ``buffer`` starts, for asynchronous
    copies: registered with CUDA at exactly that size, unregistered when ``buffer`` is freed.
    False when the system refuses (its limit on locked memory)."""
    ptr = buffer.data_ptr()
    if int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) != 0:
        return False
    weakref.finalize(buffer, _unregister, ptr).atexit = False  # (at exit the CUDA context may be gone)
    return True


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A CPU byte buffer of ``nbytes`` starting on a page boundary, and whether it is page-locked
    (``pin``: try). The pages it covers hold nothing else, so its registration never overlaps
    another one."""
    raw = torch.empty(nbytes + 2 * mmap.PAGESIZE, dtype=torch.uint8)
    start = -raw.data_ptr() % mmap.PAGESIZE
    flat = raw[start:start + nbytes]
    locked = pin and nbytes > 0 and page_lock(flat, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
    return flat, locked


class BlockSwap:
    """Streams ``blocks[resident:]`` of ``model`` to ``device`` as they run (see the module doc);
    the rest of ``model`` is moved to ``device``. Generation only (no gradients through the swap).
    :meth:`detach` stops streaming, leaving the streamed blocks in CPU memory. ``pin``:
    page-lock the CPU copies (default: when ``device`` is a CUDA GPU)."""

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str, resident: int,
                 pin: bool | None = None):
        blocks = list(blocks)
        if not 0 <= resident <= len(blocks):
            raise ValueError(f"gpu_blocks={resident}: the model has {len(blocks)} blocks; use 0..{len(blocks)}")
        self.device = torch.device(device)
        self.streamed = blocks[resident:]
        cuda = self.device.type == "cuda"
        pin = cuda if pin is None else pin
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        streamed_ids = {id(t) for b in self.streamed for t in _tensors(b)}
        # everything not streamed moves to the device, one tensor at a time (no full-model peak)
        for t in _tensors(model):
            if id(t) not in streamed_ids:
                t.data = t.data.to(self.device)
        # the streamed blocks' weights: in CPU memory, one flat buffer per block, page-locked so
        # copies run asynchronously
        self.layouts: list[FlatLayout] = []
        self.flat: list[torch.Tensor] = []
        self.host: list[list[torch.Tensor]] = []
        unlocked = 0
        for b in self.streamed:
            ts = _tensors(b)
            layout = FlatLayout.of(ts)
            flat, locked = host_buffer(layout.nbytes, pin)
            held = layout.views(flat, ts)
            for t, h in zip(ts, held):
                h.copy_(t.data)
                t.data = h  # the block's own copy is freed as it goes (no second copy of the model)
            unlocked += 0 if locked or not pin else layout.nbytes
            self.layouts.append(layout)
            self.flat.append(flat)
            self.host.append(held)
        if unlocked:
            warnings.warn(f"block swap: {unlocked / 2**20:.0f} MiB of CPU memory could not be page-locked (the system's limit "
                          "on locked memory); those blocks are copied from pageable memory, more slowly", stacklevel=2)
        self._pending: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._handles = []
        for i, b in enumerate(self.streamed):
            self._handles.append(b.register_forward_pre_hook(self._before(i)))
            self._handles.append(b.register_forward_hook(self._after(i)))

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

    def detach(self) -> None:
        """Stop streaming: the streamed blocks stay in CPU memory (move the model where wanted)."""
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
