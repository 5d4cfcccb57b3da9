"""LoRA for the diffusion transformers: training adapters, file formats, non-destructive apply.

Adapters add ``strength * scale * B(A(x))`` to the output of a model's ``nn.Linear`` through a
forward hook, so the model's own weights and state dict are never changed: unloading gives back
exactly the base outputs, and several LoRAs stack. A layer gets that hook once
(:func:`vdit_core.layers.lora_hook`) and keeps it; attaching and detaching change the tuple of
adapters it reads, and strengths live in tensors, so compiled blocks (which carry the hook from
before compiling) see every change and share one graph across blocks, runs and strengths.

Files read: ours and ComfyUI's (``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha``),
diffusers/PEFT (``transformer.<module>.lora_A/B.weight``, alpha from the header when present),
kohya (``lora_unet_<module_with_underscores>.lora_down/up.weight`` + ``.alpha``), and an
original layout's module names where the transformer maps them (Tencent's HunyuanDiT):
:class:`LoRANames` holds that rule, which ComfyUI's key map of a native model also uses.
Without an alpha the scale is 1, as ComfyUI does. A file whose modules are not in the model
raises an error naming them; it is never a silent no-op.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, describe, load_state_dict, safetensors_metadata
from .fp8 import compute_dtype
from .layers import LORA_ADAPTERS, lora_hook

PREFIXES = (  # a file's prefixes of our module names (one is taken off)
    "diffusion_model.transformer.",  # ComfyUI's own name of our modules in a native model (nodes/native.py)
    "diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.", "unet.",
)
FORMAT = "vdit-lora-v1"


class LoRAAdapter(nn.Module):
    """Low-rank update ``factor * B(A(dropout(x)))`` for one Linear (A: [r, in], B: [out, r]);
    ``factor`` is ``scale`` times its LoRA's strength, a float32 tensor (not saved), so that a new
    strength changes no compiled graph. It multiplies the rank-r intermediate in float32."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0, dropout: float = 0.0, dtype=torch.float32, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: a new adapter changes nothing
        self.scale = scale
        self.register_buffer("factor", torch.tensor(float(scale), dtype=torch.float32, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()  # [..., r]
        return (h.float() * self.factor).to(h.dtype) @ self.lora_B.t()


def _key(name: str) -> str:
    return name.replace(".", "::")  # ModuleDict keys may not contain dots


class LoRASet(nn.Module):
    """Adapters for named Linear modules of one model, applied with a common ``strength``."""

    def __init__(self, adapters: dict[str, LoRAAdapter], strength: float = 1.0, metadata: dict | None = None, source: str = ""):
        super().__init__()
        self.adapters = nn.ModuleDict({_key(k): v for k, v in adapters.items()})
        self.strength = strength
        self.metadata = dict(metadata or {})
        self.source = source
        self._layers: list[nn.Module] = []  # the model's layers this LoRA is attached to

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = float(value)
        with torch.no_grad():
            for adapter in self.adapters.values():
                adapter.factor.fill_(adapter.scale * self._strength)

    def items(self) -> Iterable[tuple[str, LoRAAdapter]]:
        for k, v in self.adapters.items():
            yield k.replace("::", "."), v

    def attach(self, model: nn.Module) -> "LoRASet":
        """Add every adapter to its module of ``model`` (which gets the LoRA hook if it has none)."""
        if self._layers:
            raise RuntimeError("this LoRA is already attached")
        modules = dict(model.named_modules())
        compiled = {id(m) for c in modules.values() if getattr(c, "_compiled_call_impl", None) is not None for m in c.modules()}
        for name, _ in self.items():
            if id(modules[name]) in compiled and not _has_hook(modules[name]):
                raise ValueError(f"{name}: its block was compiled without the LoRA hook, so compiled code would ignore the LoRA; "
                                 "compile with vdit_core.pipeline.compile_blocks, which adds it first")
        for name, adapter in self.items():
            layer = modules[name]
            add_hook(layer)
            setattr(layer, LORA_ADAPTERS, (*getattr(layer, LORA_ADAPTERS, ()), adapter))
            self._layers.append(layer)
        loras = model.__dict__.setdefault("_vdit_loras", [])
        loras.append(self)
        self.__dict__["_model"] = model  # a plain reference: not a submodule of this LoRA
        return self

    def detach(self) -> None:
        mine = {id(a) for a in self.adapters.values()}
        for layer in self._layers:
            setattr(layer, LORA_ADAPTERS, tuple(a for a in getattr(layer, LORA_ADAPTERS, ()) if id(a) not in mine))
        self._layers = []
        model = self.__dict__.get("_model")
        if model is not None:
            loras = model.__dict__.get("_vdit_loras", [])
            if self in loras:
                loras.remove(self)
            self.__dict__.pop("_model", None)


def _has_hook(layer: nn.Module) -> bool:
    return any(h is lora_hook for h in layer._forward_hooks.values())


def add_hook(layer: nn.Module) -> None:
    """Give ``layer`` the LoRA hook and an empty tuple of adapters, once; they stay (with no
    adapters the hook changes nothing). Compiled code guards on the tuple only if it exists when
    compiling."""
    if not _has_hook(layer):
        setattr(layer, LORA_ADAPTERS, getattr(layer, LORA_ADAPTERS, ()))
        layer.register_forward_hook(lora_hook)


def add_hooks(module: nn.Module) -> None:
    """The LoRA hook on every ``nn.Linear`` inside ``module``: done before compiling it, as
    compiled code never sees a hook added later."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            add_hook(m)


def attached_loras(model: nn.Module) -> list[LoRASet]:
    return list(model.__dict__.get("_vdit_loras", []))


def unload_loras(model: nn.Module) -> None:
    """Detach every LoRA attached to ``model``; its outputs are exactly the base ones again."""
    for lora in attached_loras(model):
        lora.detach()


# ----------------------------------------------------------------------------------------------
# training


def inject_lora(
    model: nn.Module,
    rank: int = 64,
    alpha: float = 64.0,
    targets: str | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> LoRASet:
    """Fresh trainable adapters (B = 0) on every Linear whose name matches ``targets`` (default:
    the transformer class's ``lora_targets``, e.g. attention and FFN of every block), attached."""
    if not targets:
        targets = getattr(model, "lora_targets", "")
        if not targets:
            raise ValueError(f"{type(model).__name__} names no default LoRA targets; pass targets= (a regex over its Linear module names)")
    pattern = re.compile(targets)
    adapters = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and pattern.fullmatch(name):
            device = module.weight.device
            adapters[name] = LoRAAdapter(module.in_features, module.out_features, rank, alpha / rank, dropout, dtype, device)
    if not adapters:
        raise ValueError(f"no Linear module of the model matches the LoRA targets {targets!r}")
    meta = {"rank": rank, "alpha": alpha, "targets": targets}
    return LoRASet(adapters, 1.0, meta).attach(model)


def save_lora(lora: LoRASet, path: str | Path, base_model: str = "", extra: dict | None = None, state: dict | None = None) -> Path:
    """Write ``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha`` (ComfyUI's convention) and
    rank/alpha/targets/base model in the safetensors header. ``state`` (keys as in
    ``lora.state_dict()``) replaces the adapters' current values, e.g. with EMA weights."""
    from safetensors.torch import save_file

    state = state or {}
    tensors = {}
    for name, a in lora.items():
        for which in ("lora_A", "lora_B"):
            value = state.get(f"adapters.{_key(name)}.{which}", getattr(a, which))
            tensors[f"diffusion_model.{name}.{which}.weight"] = value.detach().float().cpu().contiguous()
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(a.scale * a.rank, dtype=torch.float32)
    meta = {
        "format": "pt",
        "vdit_format": FORMAT,
        "vdit_base_model": base_model,
        "vdit_rank": str(lora.metadata.get("rank", "")),
        "vdit_alpha": str(lora.metadata.get("alpha", "")),
        "vdit_targets": str(lora.metadata.get("targets", "")),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# reading any supported format


_SUFFIXES = [  # (down/A suffix, up/B suffix)
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
]


def _peft_scale(metadata: dict) -> float | None:
    """alpha / r from diffusers' ``lora_adapter_metadata`` header, when it is there."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                flat[prefix + k] = v

    walk(cfg)
    r = next((v for k, v in flat.items() if k.split(".")[-1] == "r"), None)
    alpha = next((v for k, v in flat.items() if k.split(".")[-1] == "lora_alpha"), None)
    if r and alpha:
        return float(alpha) / float(r)
    return None


def lora_modules_of(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA state dict by module: {module name as the file spells it (its keys' stem): {"A": down,
    "B": up, "alpha": alpha}}, for every suffix pair of :data:`_SUFFIXES` (modules with neither
    matrix left out)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for down, up in _SUFFIXES:
            for suffix, slot in ((down, "A"), (up, "B")):
                if key.endswith(suffix):
                    pairs.setdefault(key[: -len(suffix)], {})[slot] = value
        if key.endswith(".alpha"):
            pairs.setdefault(key[: -len(".alpha")], {})["alpha"] = value
    return {k: v for k, v in pairs.items() if "A" in v or "B" in v}


KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")  # kohya's module names: one of these + the name with underscores


class LoRANames:
    """Which Linear modules of ``model`` a LoRA file's module name adapts. Names read: ours, bare or
    under one of :data:`PREFIXES` (ComfyUI's ``diffusion_model.``, diffusers' ``transformer.``,
    PEFT's ``base_model.model.``, ...); kohya's (:data:`KOHYA_PREFIXES`); and an original layout's,
    where the transformer class maps them (``lora_modules``: e.g. Tencent's fused HunyuanDiT
    projections, each feeding several of ours; ``lora_original_names`` lists them)."""

    def __init__(self, model: nn.Module):
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._kohya = {n.replace(".", "_"): n for n in self.linears}
        self._official = getattr(model, "lora_modules", None)
        self._original_names = getattr(model, "lora_original_names", None)

    def targets(self, stem: str) -> list[str]:
        """The modules ``stem`` (a file's module name) adapts, in the order of its output rows
        (several for a fused projection of an original layout); [] when it names none."""
        name = _strip_prefix(stem)
        if name in self.linears:
            return [name]
        for prefix in KOHYA_PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in self._kohya:
                return [self._kohya[name[len(prefix):]]]
        return list(self._official(name)) if self._official is not None else []

    def spellings(self) -> dict[str, list[str]]:
        """Every module name a LoRA file for this model may use (each prefix, kohya's, the
        original layout's) -> :meth:`targets`: what ComfyUI's LoRA key map of a vdit model holds."""
        bare = [*self.linears, *(self._original_names() if self._original_names is not None else ())]
        out = {}
        for name in bare:
            for prefix in ("", *PREFIXES):
                targets = self.targets(prefix + name)
                if targets and all(t in self.linears for t in targets):
                    out[prefix + name] = targets
        for under in self._kohya:
            for prefix in KOHYA_PREFIXES:
                out[prefix + under] = self.targets(prefix + under)
        return out


def read_lora(path: str | Path, model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict]:
    """{module name in ``model``: (A, B, scale)} and the header metadata of a LoRA file.

    Raises CheckpointError when the file is no LoRA, or targets modules ``model`` lacks, or has
    shapes that do not fit (a LoRA for another model).
    """
    path = Path(path)
    sd = load_state_dict(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    names = LoRANames(model)
    linears = names.linears
    file_scale = _peft_scale(metadata)

    pairs = lora_modules_of(sd)
    if not pairs:
        raise CheckpointError(f"{path}: expected a LoRA, but this looks like {describe(sd.keys())}")

    out, unmatched = {}, []
    for raw_name, parts in pairs.items():
        targets = names.targets(raw_name)
        if not targets:
            unmatched.append(raw_name)
            continue
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{path}: {raw_name} has only one of its two LoRA matrices")
        a, b_all = parts["A"].float(), parts["B"].float()
        if a.ndim != 2 or b_all.ndim != 2:
            raise CheckpointError(f"{path}: {raw_name} is a convolution LoRA ({tuple(a.shape)}); only Linear layers are supported")
        rank = a.shape[0]
        if rank == 0:
            raise CheckpointError(f"{path}: {raw_name} has rank 0 (empty matrices); the file is damaged")
        if not (torch.isfinite(a).all() and torch.isfinite(b_all).all()):
            raise CheckpointError(f"{path}: {raw_name} holds NaN or infinite weights; the file is damaged (or was saved from a diverged run)")
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
                raise CheckpointError(f"{path}: {raw_name}.alpha must be one finite number, got a tensor of shape {tuple(alpha.shape)}"
                                      + ("" if alpha.numel() != 1 else f" holding {alpha.item()}"))
            scale = float(alpha) / rank
        elif file_scale is not None:
            scale = file_scale
        else:
            scale = 1.0
        row = 0
        for target in targets:  # a fused projection of an original layout feeds several of ours, row by row
            if target not in linears:
                unmatched.append(raw_name)
                break
            lin = linears[target]
            b = b_all if len(targets) == 1 else b_all[row : row + lin.out_features]
            row += lin.out_features
            if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{path}: {raw_name} has shapes A{tuple(a.shape)} B{tuple(b_all.shape)} but {target} in this model is "
                    f"{lin.in_features} -> {lin.out_features}: a LoRA for another model"
                )
            out[target] = (a, b, scale)
        else:
            if len(targets) > 1 and row != b_all.shape[0]:
                raise CheckpointError(f"{path}: {raw_name} has {b_all.shape[0]} output rows; the modules it stands for have {row}")
    if unmatched:
        example = ", ".join(unmatched[:3])
        found = "none" if not out else f"{len(out)} of {len(pairs)}"
        raise CheckpointError(
            f"{path}: a LoRA for another model: {len(unmatched)} of its modules are not in this "
            f"{type(model).__name__} (e.g. {example}); {found} matched"
        )
    return out, metadata


def _strip_prefix(raw: str) -> str:
    for p in PREFIXES:
        if raw.startswith(p):
            return raw[len(p):]
    return raw


def load_lora(model: nn.Module, path: str | Path, strength: float = 1.0, dtype: torch.dtype | None = None) -> LoRASet:
    """Read a LoRA file and attach it to ``model`` with ``strength`` (0 gives the base output)."""
    if not math.isfinite(strength):
        raise ValueError(f"{path}: LoRA strength {strength} is not a finite number (1.0 is the trained effect, 0 none)")
    entries, metadata = read_lora(path, model)
    params = next(model.parameters())
    dtype = dtype or compute_dtype(model)
    adapters = {}
    for name, (a, b, scale) in entries.items():
        ad = LoRAAdapter(a.shape[1], b.shape[0], a.shape[0], scale, dtype=dtype, device=params.device)
        with torch.no_grad():
            ad.lora_A.copy_(a)
            ad.lora_B.copy_(b)
        adapters[name] = ad.requires_grad_(False)
    return LoRASet(adapters, strength, metadata, str(path)).attach(model)
