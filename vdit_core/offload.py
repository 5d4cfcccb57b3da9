"""Block swap: run a transformer larger than the GPU's memory by keeping only some of its blocks
there and streaming the rest from (pinned) CPU memory, two blocks ahead, on a side stream.

The first ``resident`` blocks and everything outside the blocks (embeddings, output layers) live
on the device. Each streamed block's weights stay in CPU memory; just before the block runs its
copy is waited for and the copy of the block two ahead starts, so transfers overlap compute. The
copies land in a ring of three device buffers of the largest block's size, allocated once: a copy
into a buffer is ordered after all compute queued so far, which includes the block that used that
buffer last. So the swap's device memory is those three buffers however far the CPU runs ahead
of the GPU (a copy per fetch, left to the caching allocator, grew with that lead: the memory of
a block the CPU is done with is reusable only once the GPU is past it). The output is the plain
run's exactly: the same weights, the same operations.

In CPU memory each streamed block is one flat byte buffer, its parameters views into it, page-
locked as a whole with exactly its size: torch's pinned allocator rounds every allocation up to a
power of two, which pinning tensor by tensor turns into 1.5-1.8x the streamed weights (CogVideoX-5B
in bf16: 10.3 GiB streamed, 18.4 GiB pinned), and page-locked memory is scarce (Windows allows
about half the RAM).
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

RING = 3  # device buffers: the block running and the next two arriving (blocks_that_fit's budget)
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


class CudaCopies:
    """Copies to a CUDA device on a side stream, each ordered after all compute queued so far (so
    after whatever last read the buffer it overwrites); :meth:`wait` makes the compute stream wait
    for one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        return done

    def wait(self, done: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(done)

    def finish(self) -> None:
        """The compute stream waits for every copy queued: memory freed after this is reused only
        once they are done (the allocator knows only the compute stream)."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)


class PlainCopies:
    """Copies without streams (a CPU device): done when :meth:`copy` returns."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def wait(self, done) -> None:
        pass

    def finish(self) -> None:
        pass


def copier(device: torch.device) -> CudaCopies | PlainCopies:
    return CudaCopies(device) if device.type == "cuda" else PlainCopies()


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
    :meth:`detach` stops streaming, leaving the streamed blocks in CPU memory. ``pin``:
    page-lock the CPU copies (default: when ``device`` is a CUDA GPU)."""

    def __init__(self, model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str, resident: int,
                 pin: bool | None = None):
        blocks = list(blocks)
        if not 0 <= resident <= len(blocks):
            raise ValueError(f"gpu_blocks={resident}: the model has {len(blocks)} blocks; use 0..{len(blocks)}")
        self.device = torch.device(device)
        self.streamed = blocks[resident:]
        pin = self.device.type == "cuda" if pin is None else pin
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
        # the ring of device buffers the streamed blocks run from, allocated once
        size = max((layout.nbytes for layout in self.layouts), default=0)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(RING if self.streamed else 0)]
        self.copies = copier(self.device)
        self._ready: dict[int, tuple[int, object]] = {}  # streamed block -> (its slot, its copy's event): fetched, not yet run
        self._running: dict[int, tuple[int, object]] = {}  # streamed block -> (its slot, its copy's event), while it runs
        self._handles = []
        for i, b in enumerate(self.streamed):
            self._handles.append(b.register_forward_pre_hook(self._before(i)))
            self._handles.append(b.register_forward_hook(self._after(i)))
            _STREAMED[b] = (self, i)

    def _fetch(self, i: int) -> tuple[int, object]:
        """Start copying streamed block ``i`` into a buffer of the ring that no block is running
        from or waiting in: (slot, event). Queued after all compute so far, which includes the
        last block run from that buffer."""
        busy = {slot for slot, _ in (*self._running.values(), *self._ready.values())}
        slot = next(s for s in range(len(self.slots)) if s not in busy)
        done = self.copies.copy(self.slots[slot][: self.layouts[i].nbytes], self.flat[i])
        return slot, done

    def _before(self, i: int):
        def hook(module, args):
            self._running.clear()  # blocks run one at a time: one still marked running was interrupted
            slot, done = self._running[i] = self._ready.pop(i, None) or self._fetch(i)
            self.copies.wait(done)
            for t, c in zip(_tensors(module), self.layouts[i].views(self.slots[slot], self.host[i])):
                t.data = c
            n = len(self.streamed)
            ahead = [j for j in ((i + 1) % n, (i + 2) % n) if j != i]  # the next two overlap this block's compute
            # blocks fetched and not run since (an interrupted run, a step the cache skipped) give their buffers up
            self._ready = {j: entry for j, entry in self._ready.items() if j in ahead}
            for j in ahead:
                if j not in self._ready:
                    self._ready[j] = self._fetch(j)

        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            for t, h in zip(_tensors(module), self.host[i]):
                t.data = h  # its buffer is overwritten only by a copy queued after this block's compute
            del self._running[i]

        return hook

    @contextlib.contextmanager
    def _on_device(self, i: int):
        block = self.streamed[i]
        self._before(i)(block, ())
        fetched = self._running[i]
        try:
            yield
        finally:
            self._after(i)(block, (), None)
            self._ready[i] = fetched  # still in its buffer: the block's own run (next, or next step's) takes it from there

    def detach(self) -> None:
        """Stop streaming: the streamed blocks stay in CPU memory (move the model where wanted)
        and the device buffers are released."""
        for b in self.streamed:
            _STREAMED.pop(b, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ready.clear()
        for b, held in zip(self.streamed, self.host):  # also a block an interrupted run left on its buffer
            for t, h in zip(_tensors(b), held):
                t.data = h
        self.copies.finish()
        self.slots = []


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
    for the rest of the model and the ring of three device buffers the streamed blocks run from
    (the one running, the next two arriving), 0 at the least."""
    sizes = [module_bytes(b) for b in blocks]
    total = module_bytes(model)
    if total + reserve <= free:
        return None
    room = free - reserve - (total - sum(sizes)) - RING * max(sizes, default=0)
    kept = 0
    for s in sizes:
        if room < s:
            break
        room -= s
        kept += 1
    return kept
