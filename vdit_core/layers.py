"""Building blocks shared by the model families: timestep embeddings, positional tables, MLPs.

Parameter names follow the official diffusers checkpoints (``linear_1``, ``net.0.proj``...), so
weights load by name.
"""

from __future__ import annotations

import math
import platform
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps [B] -> [B, dim], float32.

    Frequencies ``exp(-log(max_period) * k / (dim/2 - shift))``; ``flip_sin_to_cos`` puts cos first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t.float()[:, None] * exponent.exp()[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------------------------
# linear layers

# oneDNN's float32 matmul beats the default BLAS path on x86 CPUs at DiT sizes (10-40%,
# bench/linear.py) and fuses the GELU; it has no autograd and a per-call cost of ~15 us, so it
# only takes inference products of at least 2^24 multiply-adds, or weights of 2^20 values
# (memory-bound products by a few rows, where it is faster still).
_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and (x.numel() * weight.shape[0] >= 1 << 24 or weight.numel() >= 1 << 20)
    )


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "tanh" if gelu else None)


# Under torch.compile the same call, as an opaque op: inductor lowers oneDNN's linear only for
# frozen weights, and its own CPU matmul is the BLAS one.
_compiled_onednn_linear = torch.library.custom_op("vdit::onednn_linear", mutates_args=())(_onednn_linear)


@_compiled_onednn_linear.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` [..., in] -> [..., out], then tanh-approximated GELU when ``gelu``.
    Float32 inference on x86 CPUs goes through oneDNN (fused GELU); elsewhere ``F.linear``."""
    if _onednn(x, weight):
        if torch.compiler.is_compiling():
            return _compiled_onednn_linear(x, weight, bias, gelu)
        return _onednn_linear(x, weight, bias, gelu)
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (oneDNN for float32 inference on x86 CPUs). Same
    parameters and state dict keys; LoRA hooks and fp8 conversion treat it as an ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


LORA_ADAPTERS = "lora_adapters"  # the attribute holding a layer's attached LoRA adapters (vdit_core.lora)


def lora_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """The forward hook a LoRA-adapted layer carries once it has had an adapter (vdit_core.lora):
    adds the updates of the adapters attached now, a tuple attribute. Compiled code reads that
    tuple, so attaching and detaching recompile nothing of the same shapes, where hooks added or
    removed after compiling are not seen at all (dynamo does not guard a module's hooks)."""
    adapters = module.__dict__.get(LORA_ADAPTERS, ())
    if not adapters:
        return None
    x = inputs[0]
    for adapter in adapters:
        output = output + adapter(x).to(output.dtype)
    return output


def linear_gelu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(layer(x))``, fused where :func:`linear` can, unless something hooks the layer
    (a LoRA adapter adds to its output, before the GELU) or it is not a plain :class:`Linear`."""
    hooks = layer._forward_hooks.values()
    idle = all(h is lora_hook for h in hooks) and not layer.__dict__.get(LORA_ADAPTERS)
    if type(layer) is Linear and idle:
        return linear(x, layer.weight, layer.bias, gelu=True)
    return F.gelu(layer(x), approximate="tanh")


def patch_tokens(patches: torch.Tensor) -> torch.Tensor:
    """A patch-embedding convolution's output [B, D, *grid] as tokens [B, N, D], row-major. As a
    transposed view the residual stream would keep that layout (a sum takes its first operand's),
    and every LayerNorm of every block would copy it."""
    return patches.flatten(2).transpose(1, 2).contiguous()


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on a timestep embedding (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, out_dim)
        self.linear_2 = Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GELUProj(nn.Module):
    """Linear followed by tanh-approximated GELU (``net.0.proj`` in diffusers' FeedForward)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(self.proj, x)


class FeedForward(nn.Module):
    """GELU-tanh MLP. ``net`` is laid out as diffusers' (``net.0.proj``, ``net.2``) so keys match."""

    def __init__(self, dim: int, mult: int = 4, inner_dim: int | None = None):
        super().__init__()
        inner = inner_dim or dim * mult
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Identity(), Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# positional tables (computed on demand and cached; never module state, so models can be built on
# the meta device and loaded by assignment)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w), cos(pos * w)] with w_k = 10000^(-k / (dim/2)); float64, [len(pos), dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


@lru_cache(maxsize=16)
def sincos_3d(dim: int, t: int, h: int, w: int, spatial_scale: float, temporal_scale: float) -> torch.Tensor:
    """Fixed 3D sin-cos positions (CogVideoX-2B): [t*h*w, dim], time-major then row-major.

    A quarter of the channels encode time, the rest space (half for x, half for y).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    d_space, d_time = 3 * dim // 4, dim // 4
    ys = torch.arange(h, dtype=torch.float32) / spatial_scale
    xs = torch.arange(w, dtype=torch.float32) / spatial_scale
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # [h, w]
    space = torch.cat([sincos_1d(d_space // 2, gx), sincos_1d(d_space // 2, gy)], dim=1)  # [h*w, 3D/4]
    time = sincos_1d(d_time, torch.arange(t, dtype=torch.float32) / temporal_scale)  # [t, D/4]
    return torch.cat([time[:, None].expand(t, h * w, d_time), space[None].expand(t, h * w, d_space)], dim=-1).reshape(t * h * w, dim)


def rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [len(pos), dim] for pairwise-interleaved rotary embeddings."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(pos.float(), freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


@lru_cache(maxsize=16)
def rope_3d(
    head_dim: int,
    t: int,
    h: int,
    w: int,
    grid: str,
    base_h: int,
    base_w: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables [t*h*w, head_dim] (CogVideoX): channels split t : h : w = 2 : 3 : 3.

    ``grid="linspace"`` (CogVideoX 1.0) spreads the token grid over the region it would occupy
    when resized and centre-cropped into the trained ``base_h x base_w`` grid; ``"slice"``
    (CogVideoX 1.5) uses integer positions.
    """
    if grid == "linspace":
        (top, left), (bottom, right) = _resize_crop_region(h, w, base_h, base_w)
        ys = torch.linspace(top, bottom * (h - 1) / h, h, dtype=torch.float32)
        xs = torch.linspace(left, right * (w - 1) / w, w, dtype=torch.float32)
        ts = torch.linspace(0, t * (t - 1) / t, t, dtype=torch.float32)
    elif grid == "slice":
        ys = torch.arange(h, dtype=torch.float32)
        xs = torch.arange(w, dtype=torch.float32)
        ts = torch.arange(t, dtype=torch.float32)
    else:
        raise ValueError(f"unknown RoPE grid {grid!r}")
    d_t, d_h = head_dim // 4, head_dim // 8 * 3
    d_w = d_h
    tables = [rope_1d(d_t, ts), rope_1d(d_h, ys), rope_1d(d_w, xs)]

    def combine(i: int) -> torch.Tensor:
        a, b, c = (tab[i] for tab in tables)
        return torch.cat(
            [a[:, None, None].expand(t, h, w, d_t), b[None, :, None].expand(t, h, w, d_h), c[None, None].expand(t, h, w, d_w)],
            dim=-1,
        ).reshape(t * h * w, -1)

    return combine(0), combine(1)


def _resize_crop_region(h: int, w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an h x w grid lands when resized to cover base_h x base_w and centre-cropped."""
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_rotations(cos: torch.Tensor, sin: torch.Tensor, device) -> torch.Tensor:
    """The tables of :func:`rope_1d`/:func:`rope_3d` as the (cos, sin) of each channel pair's
    angle [S, D/2, 2], for :func:`rotate_` (real numbers: compiled code holds no complex tensor)."""
    return torch.stack((cos[:, ::2], sin[:, ::2]), dim=-1).to(device)


def rotate_(x: torch.Tensor, rot: torch.Tensor) -> None:
    """Rotary embedding: rotate the interleaved channel pairs (x[2i], x[2i+1]) of x [B, S, H, D]
    in place by the angles whose (cos, sin) are ``rot`` [S, D/2, 2] (from :func:`rope_rotations`),
    computed in float32. x may be a slice of a larger tensor (the video tokens of a joint sequence).

    Eagerly a complex multiply, in place for float32 (nothing copied). Under ``torch.compile`` the
    same products in real numbers, which inductor fuses: it generates no code for complex tensors,
    and on CUDA a complex view of a non-contiguous slice (the video tokens of [text; video]) fails
    to compile."""
    if torch.compiler.is_compiling():
        pairs = x.unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2], a view of x
        re, im = pairs.float().unbind(-1)
        cos, sin = rot[None, :, None].unbind(-1)  # [1, S, 1, D/2]
        pairs.copy_(torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1))
        return
    rot = torch.view_as_complex(rot)[None, :, None]
    if x.dtype == torch.float32:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rot)
    else:
        x.copy_(torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rot).flatten(-2))
