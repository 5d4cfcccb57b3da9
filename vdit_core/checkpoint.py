"""Loading weight files safely and fast.

* safetensors by default (one file, shards with a ``*.safetensors.index.json``, or a set of shards
  named ``NAME-00001-of-0000N.safetensors``, as a download dialog saves them without their index);
  ``.pt``/``.pth``/``.bin``/``.ckpt`` only through ``torch.load(weights_only=True)``.
* A wrong, truncated or mismatched file raises :class:`CheckpointError`, naming the file, what it
  looks like, and what was expected. Models are built on the meta device and the loaded tensors
  assigned (no random init, no second copy), so nothing half-loaded is ever returned.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from . import fp8
from .detect import describe  # what a state dict looks like, for the errors (the loaders import it from here)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A weight file that cannot be used for what was asked."""


# one file of a set of shards: NAME-00001-of-00003.safetensors (the numbering diffusers and
# transformers write)
SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def shard_set(path: Path) -> list[Path] | None:
    """Every file of the set of shards ``path`` belongs to, in order (None: not a shard); a
    one-line error naming those missing beside it."""
    m = SHARD.match(path.name)
    if m is None or not 1 <= int(m["index"]) <= int(m["count"]):
        return None
    count = int(m["count"])
    files = [path.parent / f"{m['stem']}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: shard {int(m['index'])} of {count}; the others must be beside it, "
                              f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    return files


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of fp32, fp16, bf16") from None


# ----------------------------------------------------------------------------------------------
# reading files


def _unwrap(sd: dict) -> dict:
    """Training checkpoints nest the weights under model / module / state_dict."""
    for key in ("state_dict", "module", "model", "ema"):  # "ema": Tencent's HunyuanDiT checkpoints
        while isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and not isinstance(sd[key], torch.Tensor):
            sd = sd[key]
    return sd


def known_fields(cls, config: dict) -> dict:
    """The entries of a config.json dict that are fields of the dataclass ``cls`` (others are
    ignored), JSON lists as tuples (frozen configs hash)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}


WRAPPER_PREFIXES = ("ema.", "module.")  # training wrappers' key prefixes (EMA copies, DDP / FSDP modules)


def unwrapped_keys(keys: Iterable[str]) -> set[str]:
    """Key names with a training wrapper's ``ema.`` / ``module.`` prefix removed (for detection)."""
    return {k.split(".", 1)[1] if k.startswith(WRAPPER_PREFIXES) else k for k in keys}


def unwrap_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the ``ema.`` / ``module.`` prefix every one of its keys carries."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _convert(key: str, t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and not fp8.keeps_dtype(key, t):
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def read_safetensors(path: Path, dtype: torch.dtype | None = None, device=None, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            out = {}
            for k in names:
                out[k] = _convert(k, f.get_tensor(k), dtype, device)
            return out
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated (size {size} bytes) "
            "or of another format"
        ) from None
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: could not be read ({e}); the file may be truncated") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def safetensors_keys(path: str | Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated "
                              f"(size {Path(path).stat().st_size} bytes) or of another format") from None


def read_pickle(path: Path, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses pickled code; truncated zips fail to open
        raise CheckpointError(
            f"{path}: could not be loaded as plain tensors with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it may be truncated, or hold "
            "pickled code, which vdit never executes"
        ) from None
    sd = _unwrap(sd)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k: _convert(k, v, dtype, device) for k, v in sd.items()}


def weight_files(path: str | Path) -> list[Path]:
    """The weight file(s) behind a file, a shard of a set (all of the set), an index JSON, or a
    folder of diffusers weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(p for p in path.glob("*.safetensors"))
        if indexes:
            return weight_files(indexes[0])
        if len(singles) == 1:
            return singles
        if len(singles) > 1 and shard_set(singles[0]) == singles:  # shards without their index
            return singles
        if len(singles) > 1:
            preferred = [p for p in singles if p.name.startswith("diffusion_pytorch_model") or p.name.startswith("model")]
            if len(preferred) == 1:
                return preferred
            raise CheckpointError(f"{path}: several .safetensors files and no index JSON: {[p.name for p in singles]}")
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if len(pickles) == 1:
            return pickles
        raise CheckpointError(f"{path}: no weight file found (expected .safetensors, or one .pt/.bin)")
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e})") from None
        files = [path.parent / s for s in shards]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {missing}")
        return files
    return shard_set(path) or [path]


def read_part(path: str | Path, prefixes: tuple[str, ...], dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor] | None:
    """The tensors of one part of a combined single-file checkpoint (ComfyUI's: ``model.``,
    ``vae.``, ``text_encoders.<name>.``): those under the first of ``prefixes`` that any key has,
    with it stripped; None when no key has one. safetensors files read only that part."""
    path = Path(path)
    if not path.is_file():
        return None
    keys = safetensors_keys(path) if path.suffix == ".safetensors" else list(load_state_dict(path).keys())
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
        return None
    wanted = [k for k in keys if k.startswith(prefix)]
    if path.suffix == ".safetensors":
        sd = read_safetensors(path, dtype, device, keys=wanted)
    else:
        sd = {k: v for k, v in load_state_dict(path, dtype, device).items() if k.startswith(prefix)}
    return {k[len(prefix):]: v for k, v in sd.items()}


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, shard index or weights folder, converted to ``dtype``."""
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            sd.update(read_safetensors(f, dtype, device))
        elif f.suffix in PICKLE_SUFFIXES:
            sd.update(read_pickle(f, dtype, device))
        else:
            raise CheckpointError(f"{f}: unsupported weight file type {f.suffix!r}; expected .safetensors (or .pt/.pth/.bin)")
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# building models


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating or initialising its parameters."""
    with torch.device("meta"):
        return factory()


def assign_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, expected: str) -> nn.Module:
    """Check keys and shapes, then assign ``sd``'s tensors as the model's parameters.

    Raises :class:`CheckpointError` naming ``source``, what it looks like and ``expected``
    before touching the model when anything does not fit.
    """
    own = {k: v for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        looks = describe(sd.keys())
        if looks.startswith(expected.split(" (")[0]):  # the right kind of file, but not whole or not this variant
            looks = f"an incomplete or other-sized {looks.removeprefix('a ').removeprefix('an ')}"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})")
        raise CheckpointError(f"{source}: expected {expected}, but this looks like {looks}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # defensive: every tensor must have come from the file
            raise CheckpointError(f"{source}: {name} was not loaded")
    return model


def load_model(
    path: str | Path,
    *,
    build: Callable,
    expected: str,
    recognise: Callable[[Iterable[str]], bool],
    from_json: Callable[[dict], object],
    infer_config: Callable[[dict], object],
    dtype: torch.dtype | None,
    device,
    config=None,
    convert: tuple[Callable, Callable] | None = None,
    label: Callable[[object], str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Load one model of a family: read the weights (file, shards or folder) in ``dtype``; turn an
    official non-diffusers layout into diffusers names (``convert = (is_it, conversion)``);
    take the config from ``config``, a folder's config.json, or the weights; build on the meta
    device and assign. Errors name the file, what it looks like and what was expected.
    ``state_dict``: weights already read from ``path`` (one part of a combined checkpoint)."""
    path = Path(path)
    sd = load_state_dict(path, dtype=dtype, device=device) if state_dict is None else state_dict
    if convert is not None and convert[0](sd.keys()):
        sd = convert[1](sd)
    elif not recognise(sd.keys()):
        raise CheckpointError(f"{path}: expected {expected}, but this looks like {describe(sd.keys())}")
    if config is None:
        json_path = path / "config.json"
        if path.is_dir() and json_path.exists():
            config = from_json(read_json(json_path))
        else:
            try:
                config = infer_config(sd)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: {e}") from None
            if path.is_dir():  # a folder normally carries its config: say loudly what was assumed
                warnings.warn(f"{path}: no config.json; the architecture was read off the weights, and what they cannot tell "
                              f"(trained sample size, positional embedding kind, latent scaling) was taken from "
                              f"{label(config) if label else 'the closest release'}; add the release's config.json if the output looks wrong",
                              stacklevel=3)
    model = build_on_meta(lambda: build(config))
    if fp8.holds_fp8(sd):  # float8 weights (ComfyUI's scaled fp8, plain casts): linear layers stay float8
        fp8.check_support(device)
        sd = fp8.adopt(model, sd, dtype)
    return assign_state_dict(model, sd, str(path), label(config) if label else expected).eval()


# ----------------------------------------------------------------------------------------------
# writing models


def save_diffusers_folder(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                          max_shard_bytes: int = 5 * 2**30, weights_name: str = "diffusion_pytorch_model") -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (sharded with an index JSON above
    ``max_shard_bytes``): the diffusers layout (``weights_name="model"``: transformers'). The new set is written beside ``folder`` and
    switched in whole, so an earlier save stays intact until the new one is complete."""
    import os
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state_dict.items()}
    shards, current, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + nbytes
    shards.append(current)
    tmp, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / f"{weights_name}.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": weight_map}
            (tmp / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)

