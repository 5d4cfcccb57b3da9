"""The registered families (``FAMILIES``, a plain dict in detection order) and finding the family
of a model folder, a weight file or a loaded transformer."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..checkpoint import CheckpointError, load_state_dict, read_json, safetensors_keys, weight_files
from ..detect import SIGNATURES, describe, signatures
from .base import Family

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (replacing one of the same name) and its file signatures; returns it."""
    if not family.name:
        raise ValueError("a family needs a name")
    FAMILIES[family.name] = family
    SIGNATURES[family.name] = family.signatures
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)
    SIGNATURES.pop(name, None)


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def for_folder(folder: str | Path, part: str | None = None) -> Family:
    """The family of a model folder; a one-line error when no family recognises it, or when the
    folder lacks what its ``part`` ("transformer", "vae", "text_encoder"; None: every part) needs
    besides the weights (naming the missing files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a model folder (model_index.json, transformer/, vae/, ...)")
    family = next((f for f in FAMILIES.values() if f.recognises_folder(folder)), None) or weights_family(folder)
    if family is not None:
        missing = family.folder_missing(folder, part)
        if missing:
            raise CheckpointError(f"{folder.name}/: an incomplete {family.label} model folder: it lacks {', '.join(missing)}; the weights "
                                  f"alone do not load: download the model's whole folder (configs and tokenizers too)")
        return family
    index = folder / "model_index.json"
    what = f"a {read_json(index).get('_class_name') or 'unknown'} pipeline" if index.is_file() else "no model_index.json"
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise CheckpointError(f"{folder}: not a model folder of any supported family ({what}); expected one of {known}")


def weights_family(folder: Path) -> Family | None:
    """The family whose transformer weights a folder holds in ``transformer/`` (a folder whose
    configs are missing), or None."""
    weights = sorted(p for p in (folder / "transformer").glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not weights:
        return None
    try:
        return for_file(weights[0], "transformer")
    except (CheckpointError, OSError, ValueError):
        return None


def file_keys(path: str | Path) -> set[str]:
    """Key names of a weight file (safetensors headers only; pickles are loaded safely)."""
    keys: set[str] = set()
    for f in weight_files(path):
        keys |= set(safetensors_keys(f)) if f.suffix == ".safetensors" else set(load_state_dict(f).keys())
    return keys


def for_file(path: str | Path, part: str) -> Family:
    """The family whose ``part`` this weight file is; a one-line error naming what it looks like."""
    keys = file_keys(path)
    for s in signatures():  # a combined checkpoint holds every part
        if s.part in (part, "checkpoint") and s.family is not None and s.test(keys):
            return FAMILIES[s.family]
    wanted = {"transformer": "a diffusion transformer", "vae": "a VAE", "text_encoder": "a text encoder"}.get(part, part)
    raise CheckpointError(f"{path}: expected {wanted} of a supported family ({', '.join(f.label for f in FAMILIES.values())}), but this looks like {describe(keys)}")


def for_transformer(transformer: nn.Module) -> Family:
    """The family of a loaded transformer."""
    for family in FAMILIES.values():
        if family.owns(transformer):
            return family
    raise ValueError(f"{type(transformer).__name__} belongs to no registered model family")
