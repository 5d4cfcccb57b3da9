"""Loader nodes: the transformer, the text encoder and the VAE, from ComfyUI's model folders, a
diffusers-format folder under models/vdit, or the bundled demo model."""

from __future__ import annotations

from pathlib import Path

import torch

from vdit_core.checkpoint import parse_dtype
from vdit_core.demo import demo_model_path
from vdit_core.models.cogvideox import load_transformer
from vdit_core.pipeline import sampling_defaults
from vdit_core.text import load_t5
from vdit_core.vae.cogvideox_vae import PRESETS as VAE_PRESETS, load_vae

from . import comfy
from .types import DEMO, ModelHandle, TextEncoderHandle, VAEHandle

DTYPES = ["default", "fp32", "fp16", "bf16"]
ATTENTION = ["auto", "sdpa", "xformers", "flash_attn", "sageattention"]


def sources(kind: str) -> list[str]:
    """Combo entries: the demo, model folders (shown with a trailing slash), weight files."""
    return [DEMO] + [f"{name}/" for name in comfy.list_model_folders()] + comfy.list_files(kind)


def resolve(choice: str, kind: str) -> tuple[Path, bool]:
    """(path, is a model folder) for a combo entry."""
    if choice == DEMO:
        return demo_model_path(), True
    if choice.endswith("/"):
        return comfy.full_path("vdit", choice.rstrip("/")), True
    return comfy.full_path(kind, choice), False


def _dtype(name: str, role: str):
    """"default": the file's dtype, except on a CPU (ComfyUI's --cpu), where half precision is
    many times slower than fp32 (ComfyUI itself runs models in fp32 there)."""
    if name != "default":
        return parse_dtype(name)
    return torch.float32 if comfy.devices(role)[0].type == "cpu" else None


class VDITModelLoader:
    """Load a CogVideoX transformer (single file, diffusers folder or the bundled demo)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sources("diffusion_models"), {"default": DEMO, "tooltip": "a file in models/diffusion_models, a model folder in models/vdit, or the bundled demo"}),
            "weight_dtype": (DTYPES, {"default": "default", "tooltip": "default keeps the file's dtype (fp32 on a CPU)"}),
            "attention": (ATTENTION, {"default": "auto", "tooltip": "auto: xformers on CUDA when installed, else PyTorch SDPA"}),
        }}

    RETURN_TYPES = ("VDIT_MODEL",)
    FUNCTION = "load"
    CATEGORY = "vdit"

    def load(self, model, weight_dtype, attention):
        path, folder = resolve(model, "diffusion_models")
        transformer = load_transformer(path / "transformer" if folder else path, dtype=_dtype(weight_dtype, "diffusion"), device="cpu")
        transformer.set_attention_backend(None if attention == "auto" else attention)
        defaults = sampling_defaults(path if folder else None, transformer.config)
        return (ModelHandle(transformer, comfy.Managed(transformer, "diffusion"), defaults, model.rstrip("/")),)


class VDITTextEncoderLoader:
    """Load the T5 text encoder: a model folder's (with its tokenizer) or a single file from
    models/text_encoders (tokenizer from ComfyUI's T5 files, or a tokenizer/ folder beside it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (sources("text_encoders"), {"default": DEMO}),
            "dtype": (DTYPES, {"default": "default"}),
            "max_length": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "tokens per prompt; 0: the model folder's (226 for CogVideoX)"}),
        }}

    RETURN_TYPES = ("VDIT_TEXT_ENCODER",)
    FUNCTION = "load"
    CATEGORY = "vdit"

    def load(self, text_encoder, dtype, max_length):
        import json

        path, folder = resolve(text_encoder, "text_encoders")
        if folder:
            weights, tokenizer = path / "text_encoder", path / "tokenizer"
            cfg = path / "transformer" / "config.json"
            length = max_length or (json.loads(cfg.read_text()).get("max_text_seq_length", 226) if cfg.exists() else 226)
        else:
            weights = path
            tokenizer = path.parent / "tokenizer" if (path.parent / "tokenizer").is_dir() else comfy.t5_tokenizer_dir()
            if tokenizer is None:
                raise ValueError(f"{path}: a single T5 file needs a tokenizer: run inside ComfyUI (its T5 tokenizer is used) "
                                 f"or put a tokenizer/ folder next to the file")
            length = max_length or 226
        encoder = load_t5(weights, tokenizer, dtype=_dtype(dtype, "text"), device="cpu", max_length=length)
        return (TextEncoderHandle(encoder, comfy.Managed(encoder.model, "text"), text_encoder.rstrip("/")),)


class VDITVAELoader:
    """Load the CogVideoX VAE (single file, model folder or the bundled demo)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (sources("vae"), {"default": DEMO}),
            "dtype": (DTYPES, {"default": "default"}),
            "variant": (["auto"] + list(VAE_PRESETS), {"default": "auto", "tooltip": "sets the latent scaling of a single file (auto: the 5B family's 0.7)"}),
        }}

    RETURN_TYPES = ("VDIT_VAE",)
    FUNCTION = "load"
    CATEGORY = "vdit"

    def load(self, vae, dtype, variant):
        path, folder = resolve(vae, "vae")
        base = None if variant == "auto" else VAE_PRESETS[variant]
        model = load_vae(path / "vae" if folder else path, dtype=_dtype(dtype, "vae"), device="cpu", base=base)
        return (VAEHandle(model, comfy.Managed(model, "vae"), vae.rstrip("/")),)


__all__ = ["VDITModelLoader", "VDITTextEncoderLoader", "VDITVAELoader"]
