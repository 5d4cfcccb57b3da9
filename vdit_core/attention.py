"""One attention function for every model, with backend dispatch.

``attention(q, k, v, kv_lens=None, mask=None, backend=None)`` takes [B, S, H, D] tensors and
returns [B, Sq, H, D]. Keys may be limited per sample by ``kv_lens`` (the first ``kv_lens[b]``
keys are valid: padded text) or by a boolean key-padding ``mask`` [B, Skv] (True = attend).
Reading a mask's values (is it all true, are the valid keys first, how many) makes a GPU wait,
so a mask shared by many calls is made once into a :class:`KeyMask`, with which no call reads
values. q, k and v may come in different dtypes; they are brought to one (:func:`compute_dtype`).

Backends:

* ``xformers``: ``memory_efficient_attention`` on CUDA; padded keys through a block-diagonal
  mask over the packed valid tokens.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (any device).
* ``flash_attn``: ``flash_attn_func`` / ``flash_attn_varlen_func`` (CUDA, fp16/bf16).
* ``sageattention``: ``sageattn`` (CUDA, fp16/bf16; quantised, so approximate).
* ``math``: the plain softmax(QK^T)V reference.

The choice is ``backend`` if given, else the ``VDIT_ATTENTION`` environment variable, else
``auto``: xformers for CUDA tensors when it is installed and runs there, SDPA otherwise. Auto
never picks a backend that cannot run on the tensors' device (xformers installs on CPU-only
machines but its kernels raise there). A requested backend that cannot run raises an error that
names the backends that can.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "flash_attn", "sageattention", "math")
ENV_VAR = "VDIT_ATTENTION"


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run here."""


# ----------------------------------------------------------------------------------------------
# availability


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=None)
def _probe(backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Run a tiny call once per (backend, device type, dtype); None if it works, else why not."""
    if backend in ("sdpa", "math"):
        return None
    module = {"xformers": "xformers", "flash_attn": "flash_attn", "sageattention": "sageattention"}[backend]
    if not _installed(module):
        return f"{module} is not installed"
    if device_type != "cuda":
        return f"{backend} runs on CUDA only (tensors are on {device_type})"
    if backend in ("flash_attn", "sageattention") and dtype not in (torch.float16, torch.bfloat16):
        return f"{backend} needs float16 or bfloat16 (got {dtype})"
    try:
        q = torch.zeros(1, 8, 1, 64, device=device_type, dtype=dtype)
        _BACKEND_FNS[backend](q, q, q, None)
    except Exception as e:  # a broken build raises all kinds of errors; the reason is reported
        return f"{backend} is installed but failed on {device_type}/{dtype}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that run for tensors of this device and dtype."""
    device_type = torch.device(device).type
    return [b for b in BACKENDS[1:] if _probe(b, device_type, dtype) is None]


def resolve_backend(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend a call would use: argument, then ``VDIT_ATTENTION``, then the automatic choice."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda" and _probe("xformers", device_type, dtype) is None:
            return "xformers"
        return "sdpa"
    why = _probe(name, device_type, dtype)
    if why is not None:
        usable = ", ".join(available_backends(device, dtype))
        raise AttentionBackendError(f"attention backend {name!r} is not available: {why}. Usable here: {usable}")
    return name


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The one dtype attention runs in: under autocast, autocast's (what SDPA casts to there);
    otherwise the widest of the three. They differ in training: under CUDA autocast LayerNorm
    runs in float32 (and Open-Sora's RMSNorm multiplies by its float32 weight), so the qk-normed
    q and k of every family arrive float32 while v is bf16; xformers, flash_attn and
    sageattention refuse mixed dtypes."""
    device_type = q.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


# ----------------------------------------------------------------------------------------------
# masks


@dataclass(frozen=True)
class KeyMask:
    """Which keys each sample attends, in the forms the backends take, made by :func:`key_mask`
    or :func:`padded_keys`. Making one reads the mask's values on the host (on a GPU: waits for
    it), and attention with one reads none. So a model whose blocks share a mask (Open-Sora's
    text in every cross-attention) makes it once per forward; a mask tensor given to
    :func:`attention` is made into one at every call.

    ``mask`` [B, Skv] bool (True = attend); when the valid keys of every sample come first
    (padding), also ``lens`` (valid keys per sample), ``index`` [sum(lens)] (the valid keys'
    positions in the flattened [B * Skv] keys) and ``cu_lens`` [B + 1] int32 (their cumulative
    counts, from 0); None otherwise.
    """

    mask: torch.Tensor
    lens: tuple[int, ...] | None = None
    index: torch.Tensor | None = None
    cu_lens: torch.Tensor | None = None


def key_mask(kv_lens: torch.Tensor | None, mask: torch.Tensor | None, skv: int, device: torch.device | str) -> KeyMask | None:
    """The :class:`KeyMask` of ``kv_lens`` [B] (the first ``kv_lens[b]`` of ``skv`` keys valid)
    or of a boolean ``mask`` [B, Skv]; None when every key is valid. Refuses a sample without a
    valid key."""
    if mask is not None:
        m = mask.to(device=device, dtype=torch.bool)
    elif kv_lens is not None:
        m = torch.arange(skv, device=device)[None] < kv_lens.to(device)[:, None]
    else:
        return None
    if not m.any(1).all():
        raise ValueError("every sample needs at least one valid key (a length or mask row of zero)")
    if m.all():
        return None
    lens = m.sum(1)
    if not torch.equal(torch.arange(m.shape[1], device=m.device)[None] < lens[:, None], m):
        return KeyMask(m)  # not valid-keys-first
    index = m.reshape(-1).nonzero().squeeze(1)
    cu_lens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return KeyMask(m, tuple(lens.tolist()), index, cu_lens)


def padded_keys(batch: int, valid: int, skv: int, device: torch.device | str) -> KeyMask:
    """The :class:`KeyMask` of the first ``valid`` of ``skv`` keys in every sample (a sequence
    padded to a length that splits over ranks), made from the numbers alone: no values read."""
    pos = torch.arange(skv, device=device)
    index = (torch.arange(batch, device=device)[:, None] * skv + pos[None, :valid]).reshape(-1)
    cu_lens = torch.arange(0, (batch + 1) * valid, valid, device=device, dtype=torch.int32)
    return KeyMask((pos < valid)[None].expand(batch, skv), (valid,) * batch, index, cu_lens)


# ----------------------------------------------------------------------------------------------
# backends: all take [B, S, H, D] tensors and an optional KeyMask; none reads a tensor's values
# on the host (sageattention's arbitrary masks aside)


def _math(q, k, v, keys, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if keys is not None:
        s = s.masked_fill(~keys.mask[:, None, None, :], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def _sdpa(q, k, v, keys, scale=None):
    attn_mask = keys.mask[:, None, None, :] if keys is not None else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def _xformers(q, k, v, keys, scale=None):
    import xformers.ops as xops

    if keys is None:
        return xops.memory_efficient_attention(q, k, v, scale=scale)
    b, sq, h, d = q.shape
    if keys.lens is not None:
        # pack the valid keys of every sample into one sequence with a block-diagonal mask
        kp = k.reshape(-1, h, d).index_select(0, keys.index)[None]
        vp = v.reshape(-1, h, d).index_select(0, keys.index)[None]
        bias = xops.fmha.BlockDiagonalMask.from_seqlens([sq] * b, list(keys.lens))
        out = xops.memory_efficient_attention(q.reshape(1, b * sq, h, d), kp, vp, attn_bias=bias, scale=scale)
        return out.reshape(b, sq, h, d)
    # arbitrary mask: a dense additive bias (xformers wants its last dim padded to 8)
    skv = k.shape[1]
    pad = (skv + 7) // 8 * 8
    bias = torch.zeros(b, h, sq, pad, device=q.device, dtype=q.dtype)
    bias[..., :skv].masked_fill_(~keys.mask[:, None, None, :], -math.inf)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias[..., :skv], scale=scale)


def _flash_attn(q, k, v, keys, scale=None):
    import flash_attn

    if keys is None:
        return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale)
    b, sq, h, d = q.shape
    if keys.lens is None:
        raise AttentionBackendError("flash_attn supports prefix key masks (lengths) only; use sdpa or xformers")
    cu_q = torch.arange(0, (b + 1) * sq, sq, device=q.device, dtype=torch.int32)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * sq, h, d),
        k.reshape(-1, h, d).index_select(0, keys.index),
        v.reshape(-1, h, d).index_select(0, keys.index),
        cu_q,
        keys.cu_lens,
        sq,
        max(keys.lens),
        softmax_scale=scale,
    )
    return out.reshape(b, sq, h, d)


def _sageattention(q, k, v, keys, scale=None):
    from sageattention import sageattn

    if keys is None:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)
    # no mask support: run each sample on its own valid keys
    outs = []
    for i in range(q.shape[0]):
        keep = slice(0, keys.lens[i]) if keys.lens is not None else keys.mask[i]
        outs.append(
            sageattn(q[i : i + 1], k[i : i + 1, keep], v[i : i + 1, keep], tensor_layout="NHD", is_causal=False, sm_scale=scale)
        )
    return torch.cat(outs)


_BACKEND_FNS = {
    "sdpa": _sdpa,
    "xformers": _xformers,
    "flash_attn": _flash_attn,
    "sageattention": _sageattention,
    "math": _math,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None = None,
    mask: torch.Tensor | KeyMask | None = None,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention over [B, S, H, D] tensors; returns [B, Sq, H, D].

    Args:
        kv_lens: [B] number of valid keys per sample (valid keys first).
        mask: [B, Skv] boolean key-padding mask, True where a key may be attended; or a
            :class:`KeyMask` made once for many calls (then no call reads a tensor's values).
        backend: see the module docstring; ``None`` reads ``VDIT_ATTENTION`` or picks automatically.
        scale: softmax scale, default ``D ** -0.5``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention takes [B, S, H, D] tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_lens is not None and mask is not None:
        raise ValueError("pass kv_lens or mask, not both")
    dtype = compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    name = resolve_backend(backend, q.device, dtype)
    if isinstance(mask, KeyMask):
        if mask.mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"a key mask of shape {tuple(mask.mask.shape)} for keys {tuple(k.shape)}; expected [B, Skv] = {tuple(k.shape[:2])}")
        keys = mask
    else:
        keys = key_mask(kv_lens, mask, k.shape[1], q.device)
    return _BACKEND_FNS[name](q, k, v, keys, scale)
