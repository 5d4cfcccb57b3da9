"""ComfyUI nodes: thin adapters over vdit_core's public API (no model maths here)."""

from . import comfy
from .loaders import VDITModelLoader, VDITTextEncoderLoader, VDITVAELoader
from .lora import VDITLoraApply
from .sampling import VDITEmptyLatent, VDITSampler
from .text import VDITTextEncode
from .vae import VDITVAEDecode, VDITVAEEncode
from .video import VDITSaveVideo

comfy.register_folders()

NODE_CLASS_MAPPINGS = {
    "VDITModelLoader": VDITModelLoader,
    "VDITTextEncoderLoader": VDITTextEncoderLoader,
    "VDITVAELoader": VDITVAELoader,
    "VDITTextEncode": VDITTextEncode,
    "VDITEmptyLatent": VDITEmptyLatent,
    "VDITSampler": VDITSampler,
    "VDITVAEEncode": VDITVAEEncode,
    "VDITVAEDecode": VDITVAEDecode,
    "VDITLoraApply": VDITLoraApply,
    "VDITSaveVideo": VDITSaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VDITModelLoader": "VDIT Model Loader (CogVideoX, Open-Sora, HunyuanDiT)",
    "VDITTextEncoderLoader": "VDIT Text Encoder Loader (T5, HunyuanDiT)",
    "VDITVAELoader": "VDIT VAE Loader",
    "VDITTextEncode": "VDIT Text Encode (prompt)",
    "VDITEmptyLatent": "VDIT Empty Latent (video size)",
    "VDITSampler": "VDIT Sampler (text to video, image to video)",
    "VDITVAEEncode": "VDIT VAE Encode",
    "VDITVAEDecode": "VDIT VAE Decode",
    "VDITLoraApply": "VDIT LoRA Apply",
    "VDITSaveVideo": "VDIT Save Video",
}
