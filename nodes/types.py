"""What travels between vdit nodes: handles around the core's objects."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vdit_core.families import Family
from vdit_core.pipeline import Pipeline

from .comfy import Managed

DEMO = "vdit-demo (bundled)"  # the model shipped inside the package


@dataclass(frozen=True)
class ModelHandle:
    """VDIT_MODEL: a transformer, its family, how to sample it, and the LoRAs to apply while sampling."""

    transformer: object
    managed: Managed
    defaults: dict  # schedule, sampler, steps, cfg, vae_scale, latent_rgb
    name: str
    family: Family
    loras: tuple = ()  # ((path, strength), ...): applied during sampling, never merged

    def with_lora(self, path: Path, strength: float) -> "ModelHandle":
        return replace(self, loras=self.loras + ((str(path), float(strength)),))

    def pipeline(self) -> Pipeline:
        return Pipeline(transformer=self.transformer, vae=None, text_encoder=None, name=self.name, family=self.family, **self.defaults)


@dataclass(frozen=True)
class TextEncoderHandle:
    """VDIT_TEXT_ENCODER: a text encoder (or a family's several) and the family that reads it."""

    encoder: object
    managed: Managed
    name: str
    family: Family


@dataclass(frozen=True)
class VAEHandle:
    """VDIT_VAE."""

    vae: object
    managed: Managed
    name: str
