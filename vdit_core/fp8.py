"""float8 weights: half the memory of bf16 for a transformer's linear layers.

A :class:`FP8Linear` stores its weight in ``float8_e4m3fn`` (or ``e5m2``) with one float32 scale
per tensor (``scale_weight``) and computes in its input's dtype: each call upcasts the weight,
multiplies by the scale and runs an ordinary matmul, so any device that holds float8 runs it.

Two ways in:

* :func:`quantize` turns the linear layers of a loaded model's blocks into float8 (per-tensor
  scale ``amax / 448``); the embeddings, norms and output layers keep their dtype.
* :func:`adopt` reads weight files that are already float8: ComfyUI's "scaled fp8" files (a
  ``scaled_fp8`` marker, ``<layer>.scale_weight`` scales, ``scale_input`` ignored) and plain
  float8 casts (scale 1). A linear layer's float8 weight stays float8; any other float8 tensor is
  dequantised to the compute dtype.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from .layers import Linear, linear

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
E4M3_MAX = 448.0  # the largest float8_e4m3fn value
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
MARKER = "scaled_fp8"  # ComfyUI's key saying a file holds scaled float8 weights


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: its first parameter's that is not float8 (float8 weights
    are only stored, and upcast to it)."""
    return next(p.dtype for p in model.parameters() if not is_fp8(p))


def keeps_dtype(key: str, t: torch.Tensor) -> bool:
    """Tensors a loader must not cast to the compute dtype: float8 weights and their float32
    scales (a bf16 scale would shift every weight of its layer by up to 0.4%)."""
    return is_fp8(t) or key.endswith(SCALE_SUFFIXES) or key == MARKER


def check_support(device: torch.device | str) -> None:
    """Refuse where float8 weights cannot be held: a torch without float8 dtypes, or a device
    without float8 tensors (Apple's MPS)."""
    if not FP8_DTYPES:
        raise ValueError(f"fp8: this PyTorch ({torch.__version__}) has no float8 dtypes; PyTorch 2.1 or later has them (or load in bf16)")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"fp8: float8 weights are not supported on {dev.type}; use cpu or cuda, or load in bf16/fp16")


class FP8Linear(nn.Linear):
    """``nn.Linear`` with a float8 weight and a per-tensor float32 ``scale_weight``; computes in
    the input's dtype (``x @ (weight * scale).T + bias``). The bias keeps the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 weight_dtype: torch.dtype = FP8_DTYPES[0] if FP8_DTYPES else torch.float32, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=weight_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("scale_weight", torch.ones((), device=device, dtype=torch.float32))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: float8 values times the scale, multiplied in float32 and
        rounded once. (A scale cast to bf16 first scales the whole layer by its rounding error,
        up to 0.2%, before the product is rounded again; on CUDA even a bf16 weight times the
        float32 scale tensor casts the scale to bf16 inside the kernel.)"""
        return (self.weight.float() * self.scale_weight.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], in x's dtype
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.dequantized(x.dtype), bias)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None, return_weight: bool = False, **kwargs):
        """Store a patched weight given in stored units (``weight / scale``, as ComfyUI's model
        patcher reads this layer: it has no ``convert_weight``), rounded to float8 stochastically
        (:func:`round_stochastic`, seeded) so that patches smaller than a float8 step survive on
        average; a value already in float8 is kept exactly."""
        q = round_stochastic(weight, self.weight.dtype, seed)
        if return_weight:
            return q
        if inplace_update:
            self.weight.data.copy_(q)
        else:
            self.weight = nn.Parameter(q, requires_grad=False)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, seed: int | None = None) -> torch.Tensor:
    """``x`` in float8 ``dtype``, each value rounded to one of its two float8 neighbours with
    the probability of its distance to the other (unbiased), clamped to the format's range.
    Exact where ``x`` is a float8 value already. Computed in float32; ``seed`` fixes the draw."""
    info = torch.finfo(dtype)
    mantissa_bits, min_exponent = round(-math.log2(info.eps)), round(math.log2(info.tiny))
    x = x.float()
    a = x.abs().clamp(max=info.max)
    step = torch.exp2(torch.floor(torch.log2(a)).clamp(min=min_exponent) - mantissa_bits)  # float8 spacing at |x| (log2(0) = -inf: clamped)
    scaled = a / step  # (exact: step is a power of 2)
    low = scaled.floor()
    g = torch.Generator(device=x.device)
    g.manual_seed(0 if seed is None else seed)
    up = torch.rand(x.shape, generator=g, device=x.device) < scaled - low
    return (torch.sign(x) * (low + up) * step).clamp(info.min, info.max).to(dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale) with ``weight * scale ~= w``: the tensor's largest magnitude
    maps to the format's largest value."""
    dtype = dtype or FP8_DTYPES[0]
    amax = w.detach().abs().max().float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (w.detach().float() / scale).to(dtype), scale.reshape(())


@torch.no_grad()
def quantize(model: nn.Module, modules: Iterable[nn.Module], dtype: torch.dtype | None = None) -> int:
    """Turn every ``nn.Linear`` inside ``modules`` (a family's transformer blocks) into an
    :class:`FP8Linear`, one layer at a time (the full-precision weight is freed as it goes).
    Returns the number of layers converted."""
    check_support(next(model.parameters()).device)
    inside = {id(m) for block in modules for m in block.modules()}
    count = 0
    for name, m in list(model.named_modules()):
        if id(m) not in inside or type(m) not in (nn.Linear, Linear):
            continue
        q, scale = quantize_weight(m.weight, dtype)
        new = FP8Linear(m.in_features, m.out_features, m.bias is not None, device="meta", weight_dtype=q.dtype)
        new.weight = nn.Parameter(q, requires_grad=False)
        new.scale_weight = scale.to(q.device)
        if m.bias is not None:
            new.bias = m.bias
        new.train(m.training)
        _replace(model, name, new)
        count += 1
    return count


def holds_fp8(sd: dict[str, torch.Tensor]) -> bool:
    return MARKER in sd or any(is_fp8(v) or k.endswith(SCALE_SUFFIXES) for k, v in sd.items())


def adopt(model: nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Ready a state dict with float8 weights for ``model`` (built on the meta device): the
    linear layers whose weights are float8 become :class:`FP8Linear` (scale 1 where the file has
    none); other float8 tensors, and weights that come with a scale but are not float8, are
    dequantised to ``dtype`` (bf16 when None). Returns the state dict to assign."""
    dtype = dtype or torch.bfloat16
    sd = {k: v for k, v in sd.items() if k != MARKER and not k.endswith(".scale_input")}
    linears = {n for n, m in model.named_modules() if type(m) in (nn.Linear, Linear)}
    out = {}
    for key, t in sd.items():
        if key.endswith(".scale_weight"):
            continue
        layer, _, leaf = key.rpartition(".")
        scale = sd.get(layer + ".scale_weight") if leaf == "weight" else None
        if leaf == "weight" and layer in linears and is_fp8(t):
            m = model.get_submodule(layer)
            _replace(model, layer, FP8Linear(m.in_features, m.out_features, m.bias is not None, device="meta", weight_dtype=t.dtype))
            out[key] = t
            out[layer + ".scale_weight"] = (scale if scale is not None else torch.ones(())).float().reshape(()).to(t.device)
        elif scale is not None or is_fp8(t):  # the scale applied in float32, as FP8Linear does
            out[key] = (t.float() * scale.to(device=t.device, dtype=torch.float32)).to(dtype) if scale is not None else t.to(dtype)
        else:
            out[key] = t
    return out
