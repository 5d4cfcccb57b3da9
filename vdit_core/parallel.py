"""Several processes for one video: the engine of ``torchrun -m vdit_core.generate``.

Two splits, combinable (world = CFG groups x sequence ranks):

* **CFG branches on different ranks**: with guidance, the ranks form two groups; one runs the
  conditional branch, the other the unconditional one, and each step ends with one exchange of
  the two x0 estimates (:class:`ParallelCFGDenoiser`). Cheap: one all-gather per step.
* **Sequence parallel (Ulysses)**: each rank of a group holds a contiguous part of the video
  tokens; every step outside attention works on tokens independently, so only attention
  exchanges data: an all-to-all turns [B, S/W, H, D] (a part of the tokens, every head) into
  [B, S, H/W, D] (every token, a part of the heads) and back (:class:`SequenceParallel`).
  Token counts that do not divide are padded with tokens the attention ignores; the head count
  must divide by the sequence ranks.

Every rank runs the same sampler on the same noise and ends each step with the same latents;
models take a :class:`SequenceParallel` through ``set_sequence_parallel`` and know nothing of
ranks. Outside training (``vdit_core.train``), this module is the only code that speaks to
``torch.distributed``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import attention as local_attention
from .attention import padded_keys


class SequenceParallel:
    """Ulysses sequence parallelism over a process group (the ranks that share one CFG branch).

    ``split`` gives this rank its part of a sequence (zero-padded to a multiple of the ranks) and
    remembers the sequence's true length; ``attention`` attends over the whole sequence from the
    parts; ``gather`` puts the parts back together, cropped to the true length.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.length: int | None = None  # tokens of the sequence last split (the padded ones excluded)

    def check_heads(self, heads: int, what: str = "this model") -> None:
        if heads % self.size:
            fits = [n for n in range(1, heads + 1) if heads % n == 0 and n <= 16]
            raise ValueError(f"sequence parallel over {self.size} ranks: {what} has {heads} attention heads, "
                             f"which do not divide by {self.size}; use {', '.join(map(str, fits))} sequence ranks")

    def any_rank(self, flag: bool, device: torch.device | str) -> bool:
        """Whether ``flag`` is true on any rank of the group (every rank calls it; on a GPU it
        waits for the GPU)."""
        t = torch.full((1,), float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous part of ``x`` along ``dim`` (the sequence padded with zeros)."""
        n = x.shape[dim]
        self.length = n
        part = -(-n // self.size)
        if part * self.size != n:
            pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, part * self.size - n]
            x = F.pad(x, pad)
        return x.narrow(dim, self.rank * part, part).contiguous()

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's part of ``x`` along ``dim``, joined in rank order and cropped to the
        length of the sequence last split."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.length)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # [B, s, H, D] (this rank's tokens, every head) -> [B, s * W, H / W, D] (every token, this rank's heads)
        b, s, h, d = x.shape
        w = self.size
        send = x.reshape(b, s, w, h // w, d).permute(2, 0, 1, 3, 4).contiguous()  # [W (to), B, s, H/W, D]
        recv = torch.empty_like(send)  # [W (from), B, s, H/W, D]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, w * s, h // w, d)

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, s * W, H / W, D] -> [B, s, H, D]: the inverse of _heads_to_tokens
        b, n, hw, d = x.shape
        w = self.size
        send = x.reshape(b, w, n // w, hw, d).transpose(0, 1).contiguous()  # [W (to), B, s, H/W, D]
        recv = torch.empty_like(send)  # [W (from: head group), B, s, H/W, D]
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n // w, w * hw, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int = 0, backend: str | None = None) -> torch.Tensor:
        """Attention over the whole sequence from this rank's part.

        q, k, v: [B, P + s, H, D]: ``prefix`` P tokens every rank holds alike (CogVideoX's text),
        then this rank's s tokens of the split sequence. Returns [B, P + s, H, D], what single-
        process attention gives for those tokens.
        """
        heads = q.shape[2] // self.size
        lo = self.rank * heads

        def whole(x):  # [B, P + s, H, D] -> [B, P + s * W, H / W, D]
            return torch.cat([x[:, :prefix, lo : lo + heads], self._heads_to_tokens(x[:, prefix:])], dim=1)

        q_, k_, v_ = whole(q), whole(k), whole(v)
        keys = None
        if q_.shape[1] != prefix + self.length:  # the padding tokens are not attended
            # a mask made from the lengths alone: a length or mask tensor would be read on the
            # host at every call, a GPU sync in every block
            keys = padded_keys(q.shape[0], prefix + self.length, q_.shape[1], q.device)
        out = local_attention(q_, k_, v_, mask=keys, backend=backend)  # [B, P + S', H/W, D]
        if prefix:
            heads_of = [torch.empty_like(out[:, :prefix]) for _ in range(self.size)]
            dist.all_gather(heads_of, out[:, :prefix].contiguous(), group=self.group)
            return torch.cat([torch.cat(heads_of, dim=2), self._tokens_to_heads(out[:, prefix:])], dim=1)
        return self._tokens_to_heads(out)


class ParallelCFGDenoiser:
    """Classifier-free guidance with the two branches on two rank groups: this rank runs one
    branch, and each step the pair exchanges x0 estimates; the guided x0 is
    :class:`vdit_core.guidance.CFGDenoiser`'s."""

    def __init__(self, model, scale: float | Callable[[torch.Tensor], float], group: dist.ProcessGroup, branch: int):
        self.model = model
        self.scale = scale
        self.group = group
        self.branch = branch  # 0: conditional, 1: unconditional
        self.noise_form = model.noise_form

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None = None) -> torch.Tensor:
        scale = self.scale(sigma) if callable(self.scale) else self.scale
        if uncond is None or scale == 1.0:
            return self.model(x, sigma, **cond)
        mine = self.model(x, sigma, **(cond if self.branch == 0 else uncond)).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.group)
        x0_cond, x0_uncond = both
        return x0_uncond + scale * (x0_cond - x0_uncond)


@dataclass
class Parallel:
    """How this run is split over the ranks of the default process group."""

    rank: int
    world: int
    cfg_groups: int  # 2: CFG branches on two rank groups; 1: every rank runs both
    sequence: SequenceParallel | None  # None: one rank per group
    cfg_group: dist.ProcessGroup | None  # this rank and its partner in the other branch group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sequence_ranks(self) -> int:
        return self.world // self.cfg_groups

    def describe(self) -> str:
        parts = []
        if self.cfg_groups == 2:
            parts.append("CFG branches on 2 rank groups")
        if self.sequence_ranks > 1:
            parts.append(f"sequence parallel over {self.sequence_ranks} ranks" + (" in each" if self.cfg_groups == 2 else ""))
        return f"{self.world} ranks: " + ", ".join(parts)

    def guidance(self, model, scale):
        """The CFG wrapper for this split (the plain batched one without a CFG split)."""
        if self.cfg_groups == 2:
            return ParallelCFGDenoiser(model, scale, self.cfg_group, branch=self.rank // self.sequence_ranks)
        from .guidance import CFGDenoiser

        # the ranks of a sequence split decide the out-of-memory fallback together
        return CFGDenoiser(model, scale, agree=self.sequence.any_rank if self.sequence is not None else None)


def plan(guidance: bool, split_cfg: bool = True, heads: int | None = None) -> Parallel:
    """The split for the initialised default process group: CFG branches on two groups when the
    world is even, guidance is on and ``split_cfg``; the sequence over the ranks of each group.
    Every rank must call it (it creates process groups). ``heads``: refuse early when the
    sequence ranks do not divide them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg_groups = 2 if split_cfg and guidance and world % 2 == 0 else 1
    n = world // cfg_groups
    seq_group = cfg_group = None
    for g in range(cfg_groups):  # every rank creates every group, in the same order
        ranks = list(range(g * n, (g + 1) * n))
        group = dist.new_group(ranks)
        if rank in ranks:
            seq_group = group
    if cfg_groups == 2:
        for i in range(n):
            group = dist.new_group([i, n + i])
            if rank % n == i:
                cfg_group = group
    sequence = SequenceParallel(seq_group) if n > 1 else None
    if sequence is not None and heads is not None:
        sequence.check_heads(heads)
    return Parallel(rank, world, cfg_groups, sequence, cfg_group)


def enable(pipe, parallel: Parallel) -> None:
    """Run ``pipe`` (a :class:`vdit_core.pipeline.Pipeline`) split as ``parallel`` says."""
    pipe.parallel = parallel
    pipe.transformer.set_sequence_parallel(parallel.sequence)


def configured_heads(model_folder: str | Path) -> int | None:
    """The attention heads a model folder's transformer config names (read before loading)."""
    try:
        cfg = json.loads((Path(model_folder) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = cfg.get("num_attention_heads", cfg.get("num_heads"))
    return heads if isinstance(heads, int) else None


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the ``WORLD_SIZE`` environment) with
    more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None) -> torch.device:
    """Join the launcher's process group (NCCL for CUDA, gloo for CPU); returns this rank's
    device (CUDA: the local rank's GPU)."""
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return want


def is_main_rank() -> bool:
    """Rank 0 of the launch (before or after joining the process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
