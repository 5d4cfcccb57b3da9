"""Loader nodes: the transformer, the text encoder and the VAE, from ComfyUI's model folders, a
model folder under models/vdit, or the bundled demo model. The family of each file or folder is
detected; its loader does the rest."""

from __future__ import annotations

from pathlib import Path

import torch

from vdit_core import families
from vdit_core.checkpoint import parse_dtype
from vdit_core.demo import demo_model_path
from vdit_core.pipeline import check_transformer_options, setup_transformer

from . import comfy
from .types import DEMO, ModelHandle, TextEncoderHandle, VAEHandle

DTYPES = ["default", "fp32", "fp16", "bf16"]
FP8 = "fp8_e4m3fn"  # the transformer's block weights in float8, computed in the default dtype
ATTENTION = ["auto", "sdpa", "xformers", "flash_attn", "sageattention"]


CHECKPOINTS = "checkpoints: "  # how files of models/checkpoints (a whole model in one file) are offered


def sources(kind: str) -> list[str]:
    """Combo entries: the demo, model folders (shown with a trailing slash), weight files, and
    single-file checkpoints from models/checkpoints (every loader takes its part of one)."""
    return ([DEMO] + [f"{name}/" for name in comfy.list_model_folders()] + comfy.list_files(kind)
            + [CHECKPOINTS + name for name in comfy.list_files("checkpoints")])


def location(choice: str, kind: str) -> tuple[str, str]:
    """(ComfyUI model directory, name inside it) a combo entry other than the demo reads."""
    if choice.endswith("/"):
        return comfy.MODEL_FOLDERS, choice.rstrip("/")
    if choice.startswith(CHECKPOINTS):
        return "checkpoints", choice[len(CHECKPOINTS):]
    return kind, choice


def resolve(choice: str, kind: str) -> tuple[Path, bool]:
    """(path, is a model folder) for a combo entry."""
    if choice == DEMO:
        return demo_model_path(), True
    return comfy.full_path(*location(choice, kind)), choice.endswith("/")


def _dtype(name: str, role: str):
    """"default": the file's dtype, except on a CPU (ComfyUI's --cpu), where half precision is
    many times slower than fp32 (ComfyUI itself runs models in fp32 there)."""
    if name != "default":
        return parse_dtype(name)
    return torch.float32 if comfy.devices(role)[0].type == "cpu" else None


class VDITModelLoader:
    """Load a diffusion transformer (single file, model folder or the bundled demo)."""

    KIND = "diffusion_models"  # the ComfyUI model directory of its single files

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sources(cls.KIND), {"default": DEMO, "tooltip": "a file in models/diffusion_models, a model folder in models/vdit, or the bundled demo"}),
            "weight_dtype": (DTYPES + [FP8], {"default": "default", "tooltip": "default keeps the file's dtype (fp32 on a CPU; float8 files stay float8); fp8_e4m3fn stores the blocks' linear layers in float8: about half the memory of bf16, slightly different output"}),
            "attention": (ATTENTION, {"default": "auto", "tooltip": "auto: xformers on CUDA when installed, else PyTorch SDPA"}),
        }, "optional": {
            "compile": ("BOOLEAN", {"default": False, "tooltip": "compile each transformer block with torch.compile: faster steps after a slower first one (needs triton on CUDA, a C++ compiler on a CPU)"}),
            "gpu_blocks": ("INT", {"default": -1, "min": -1, "max": 200, "tooltip": "block swap: transformer blocks kept on the GPU, the others streamed from CPU memory as they run (slower, much less GPU memory). -1: automatic (the whole model when it fits in the free GPU memory, else as many blocks as fit)"}),
        }}

    RETURN_TYPES = ("VDIT_MODEL",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a video or image diffusion transformer (DiT): CogVideoX text/image-to-video, HunyuanDiT text-to-image, Open-Sora 1.2, "
                   "or the bundled demo. The model family is detected from the folder or the weights.")
    CATEGORY = "vdit"

    def load(self, model, weight_dtype, attention, compile=False, gpu_blocks=-1):
        transformer, family, _, defaults = load_transformer(model, weight_dtype, attention, compile, None if gpu_blocks < 0 else gpu_blocks)
        return (ModelHandle(transformer, comfy.Managed(transformer, "diffusion", None if compile else list(family.blocks(transformer)),
                                                                 None if gpu_blocks < 0 else gpu_blocks), defaults, model.rstrip("/"), family),)


def load_transformer(choice: str, weight_dtype: str, attention: str, compile: bool, gpu_blocks: int | None = None):
    """(transformer on the CPU, family, model folder or None, sampling defaults) of a loader's
    choices, every option checked before anything is read."""
    device = comfy.devices("diffusion")[0]
    dtype = _dtype("default" if weight_dtype == FP8 else weight_dtype, "diffusion")
    # placing it is ComfyUI's (its model management, or our block swap): loaded on the CPU here
    options = dict(attention=None if attention == "auto" else attention, compile=compile, fp8=weight_dtype == FP8)
    check_transformer_options(device, dtype, gpu_blocks=gpu_blocks, **options)
    path, folder = resolve(choice, VDITLoadModel.KIND)
    family = families.for_folder(path, "transformer") if folder else families.for_file(path, "transformer")
    transformer = setup_transformer(family, path / "transformer" if folder else path, "cpu", dtype, **options)
    return transformer, family, path if folder else None, family.model_defaults(path if folder else None, transformer.config)


class VDITLoadModel:
    """Load a diffusion transformer as a ComfyUI MODEL: KSampler, the LoRA loaders, model patches
    and ComfyUI's memory management work on it."""

    KIND = VDITModelLoader.KIND

    @classmethod
    def INPUT_TYPES(cls):
        spec = VDITModelLoader.INPUT_TYPES()
        spec["optional"].pop("gpu_blocks")  # ComfyUI's own memory management places it
        return spec

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a video or image diffusion transformer (DiT) as a ComfyUI model for KSampler and ComfyUI's other sampling nodes: "
                   "CogVideoX text/image-to-video, HunyuanDiT text-to-image, Open-Sora 1.2, or the bundled demo. The family is detected "
                   "from the folder or the weights; its prediction type, schedule and preview colours come with it.")
    CATEGORY = "vdit"

    def load(self, model, weight_dtype, attention, compile=False):
        from . import native

        transformer, family, folder, defaults = load_transformer(model, weight_dtype, attention, compile)
        return (native.native_model(transformer, family, folder, model.rstrip("/"), defaults),)


class VDITTextEncoderLoader:
    """Load the text encoder(s): a model folder's (with its tokenizer) or a single file from
    models/text_encoders (tokenizer from ComfyUI's T5 files, or a tokenizer/ folder beside it)."""

    KIND = "text_encoders"  # the ComfyUI model directory of its single files

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (sources(cls.KIND), {"default": DEMO, "tooltip": "a model folder in models/vdit (its text encoder(s) and tokenizers), a file in models/text_encoders, a whole-model file from models/checkpoints, or the bundled demo"}),
            "dtype": (DTYPES, {"default": "default", "tooltip": "default keeps the file's dtype (fp32 on a CPU)"}),
            "max_length": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": f"tokens per prompt; 0: the model's ({families.quote('text_length')})"}),
        }, "optional": {
            "family": (["auto"] + list(families.FAMILIES), {"default": "auto", "tooltip": "which model the prompts are for: a T5 file serves CogVideoX and Open-Sora, which encode differently (auto: the folder's model; a lone T5 file: CogVideoX)"}),
        }}

    RETURN_TYPES = ("VDIT_TEXT_ENCODER",)
    FUNCTION = "load"
    DESCRIPTION = "Loads the text encoder(s) of a model: T5 for CogVideoX and Open-Sora, the bilingual CLIP (BERT) and mT5 for HunyuanDiT."
    CATEGORY = "vdit"

    def load(self, text_encoder, dtype, max_length, family="auto"):
        path, folder = resolve(text_encoder, self.KIND)
        dtype_ = _dtype(dtype, "text")
        chosen = families.get(family) if family != "auto" else None
        if folder:
            found = families.for_folder(path, "text_encoder")
            if chosen is not None and chosen is not found:
                raise ValueError(f"{text_encoder}: this folder's text encoder is {found.label}'s; it cannot encode for {chosen.label} (set family to auto)")
            family = found
            encoder = family.load_text_encoder(path, dtype_, "cpu", max_length=max_length)
        else:
            found = families.for_file(path, "text_encoder")
            if chosen is not None and chosen is not found and not (chosen.text_encoder_kind and chosen.text_encoder_kind == found.text_encoder_kind):
                raise ValueError(f"{path.name}: {families.describe(families.file_keys(path))}, not a text encoder {chosen.label} uses")
            family = chosen or found
            tokenizer = path.parent / "tokenizer" if (path.parent / "tokenizer").is_dir() else comfy.tokenizer_root()
            if tokenizer is None:
                raise ValueError(f"{path}: a single text encoder file needs a tokenizer: run inside ComfyUI (its tokenizers "
                                 f"are used) or put a tokenizer/ folder next to the file")
            encoder = family.load_text_encoder(path, dtype_, "cpu", tokenizer=tokenizer, max_length=max_length)
        return (TextEncoderHandle(encoder, comfy.Managed(encoder.model, "text"), text_encoder.rstrip("/"), family),)


class VDITVAELoader:
    """Load a VAE (single file, model folder or the bundled demo)."""

    KIND = "vae"  # the ComfyUI model directory of its single files

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (sources(cls.KIND), {"default": DEMO, "tooltip": "a model folder in models/vdit, a file in models/vae, a whole-model file from models/checkpoints, or the bundled demo"}),
            "dtype": (DTYPES, {"default": "default", "tooltip": "default keeps the file's dtype (fp32 on a CPU)"}),
            "variant": (["auto"] + families.vae_variants(), {"default": "auto", "tooltip": "sets the latent scaling of a single file (auto: the 5B family's 0.7)"}),
        }}

    RETURN_TYPES = ("VDIT_VAE",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a model's VAE: CogVideoX's 3D causal video VAE, the SDXL-style image VAE of HunyuanDiT, or Open-Sora's two-stage (per-frame + temporal) VAE."
    CATEGORY = "vdit"

    def load(self, vae, dtype, variant):
        model, _ = load_vae(vae, dtype, variant)
        return (VAEHandle(model, comfy.Managed(model, "vae"), vae.rstrip("/")),)


def load_vae(choice: str, dtype: str, variant: str):
    """(the VAE of a loader's choices on the CPU, its family)."""
    path, folder = resolve(choice, VDITLoadVAE.KIND)
    family = families.for_folder(path, "vae") if folder else families.for_file(path, "vae")
    return family.load_vae(path / "vae" if folder else path, _dtype(dtype, "vae"), "cpu", None if variant == "auto" else variant), family


class VDITLoadVAE:
    """Load a VAE as a ComfyUI VAE (VAE Decode, VAE Decode (Tiled), VAE Encode)."""

    KIND = VDITVAELoader.KIND

    @classmethod
    def INPUT_TYPES(cls):
        return VDITVAELoader.INPUT_TYPES()

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a model's VAE for ComfyUI's VAE Decode and VAE Encode: CogVideoX's 3D causal video VAE, the SDXL-style image "
                   "VAE of HunyuanDiT, or Open-Sora's two-stage VAE. Decodes chunk by chunk in time, tiled to the free memory, with "
                   "progress and cancel between chunks.")
    CATEGORY = "vdit"

    def load(self, vae, dtype, variant):
        from . import native

        model, family = load_vae(vae, dtype, variant)
        return (native.native_vae(model, family.size_multiple(spatial_scale=model.spatial_compression)),)


__all__ = ["VDITModelLoader", "VDITTextEncoderLoader", "VDITVAELoader", "VDITLoadModel", "VDITLoadVAE"]
