"""What a weight file is, from its key names: the one table that both dispatch and the
"expected X, but this looks like Y" errors read.

Each model family registers the signatures of its files here when it registers
(``families.register``); a few formats that no family loads are named too, so users learn what
they picked. This module imports nothing of vdit_core, so the loaders can describe any file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Signature:
    """How one kind of weight file is recognised from its key names."""

    label: str  # what it looks like, in words: "a CogVideoX VAE (diffusers layout)"
    test: Callable[[set[str]], bool]
    family: str | None = None  # the registered family that loads it (None: a format we only name)
    part: str | None = None  # "transformer", "vae", "text_encoder", "lora", or "checkpoint" (all of a model in one file)
    layout: str = "diffusers"  # "diffusers" or an official layout converted at load ("sat", ...)


# each registered family's signatures by family name, in registration order (kept by
# families.register / unregister)
SIGNATURES: dict[str, tuple[Signature, ...]] = {}

# formats no registered family loads: named in errors so users learn what they picked
OTHER_SIGNATURES: tuple[Signature, ...] = (
    Signature("a LoRA", lambda k: any(".lora_" in x or "lora_down" in x or "lora_A" in x for x in k), part="lora"),
    Signature("a UNet (Stable Diffusion family)", lambda k: any(x.startswith("model.diffusion_model.input_blocks.") or x.startswith("input_blocks.") for x in k)),
)


def signatures() -> list[Signature]:
    """Every known file kind, the families' first (in registration order)."""
    return [s for family in SIGNATURES.values() for s in family] + list(OTHER_SIGNATURES)


def detect(keys: Iterable[str]) -> Signature | None:
    """What a state dict with these keys is (None: nothing known)."""
    ks = set(keys)
    for sig in signatures():
        if sig.test(ks):
            return sig
    return None


def describe(keys: Iterable[str]) -> str:
    """What a state dict looks like, in words."""
    ks = set(keys)
    sig = detect(ks)
    if sig is not None:
        return sig.label
    return f"an unrecognised state dict ({len(ks)} tensors, e.g. {', '.join(sorted(ks)[:3])})"
