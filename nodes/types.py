"""What travels between vdit nodes: handles around the core's objects."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vdit_core.pipeline import CogVideoXPipeline

from .comfy import Managed

DEMO = "vdit-demo (bundled)"  # the model shipped inside the package


@dataclass(frozen=True)
class ModelHandle:
    """VDIT_MODEL: a transformer, how to sample it, and the LoRAs to apply while sampling."""

    transformer: object
    managed: Managed
    defaults: dict  # schedule, sampler, steps, cfg
    name: str
    loras: tuple = ()  # ((path, strength), ...): applied during sampling, never merged

    def with_lora(self, path: Path, strength: float) -> "ModelHandle":
        return replace(self, loras=self.loras + ((str(path), float(strength)),))

    def pipeline(self) -> CogVideoXPipeline:
        return CogVideoXPipeline(transformer=self.transformer, vae=None, text_encoder=None, name=self.name, **self.defaults)


@dataclass(frozen=True)
class TextEncoderHandle:
    """VDIT_TEXT_ENCODER."""

    encoder: object
    managed: Managed
    name: str


@dataclass(frozen=True)
class VAEHandle:
    """VDIT_VAE."""

    vae: object
    managed: Managed
    name: str
