"""ComfyUI nodes: thin adapters over vdit_core's public API (no model maths here)."""

from . import comfy, routes
from .loaders import VDITLoadModel, VDITLoadVAE, VDITModelLoader, VDITTextEncoderLoader, VDITVAELoader
from .lora import VDITLoraApply
from .native_sampling import VDITDynamicCFGGuider, VDITSamplerSelect, VDITStepCache
from .sampling import VDITEmptyLatent, VDITEmptyLatentVideo, VDITImageToVideo, VDITSampler
from .text import VDITPromptEncode, VDITTextEncode
from .vae import VDITVAEDecode, VDITVAEEncode
from .video import VDITSaveVideo

comfy.register_folders()
routes.register()

NODE_CLASS_MAPPINGS = {
    # ComfyUI-native: MODEL, VAE, CONDITIONING and LATENT for KSampler, VAE Decode and the rest of ComfyUI
    "VDITLoadModel": VDITLoadModel,
    "VDITLoadVAE": VDITLoadVAE,
    "VDITPromptEncode": VDITPromptEncode,
    "VDITEmptyLatentVideo": VDITEmptyLatentVideo,
    "VDITImageToVideo": VDITImageToVideo,
    "VDITSamplerSelect": VDITSamplerSelect,
    "VDITDynamicCFGGuider": VDITDynamicCFGGuider,
    "VDITStepCache": VDITStepCache,
    # vdit's own types (VDIT_MODEL, VDIT_VAE, VDIT_CONDITIONING), kept for saved workflows
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

# vdit's own node set, superseded by ComfyUI's nodes on vdit's native models: marked deprecated
# (ComfyUI hides them from search and badges them), kept so that saved workflows load and run as
# before. What replaces each:
REPLACED_BY = {
    "VDITModelLoader": "VDIT Load Model (a ComfyUI MODEL; ComfyUI's low-VRAM loading replaces block swap)",
    "VDITVAELoader": "VDIT Load VAE",
    "VDITTextEncode": "VDIT Prompt Encode",
    "VDITEmptyLatent": "VDIT Empty Latent Video",
    "VDITSampler": "KSampler, or SamplerCustomAdvanced with VDIT Sampler Select / VDIT Dynamic CFG Guider",
    "VDITVAEEncode": "VAE Encode with VDIT Load VAE (image to video: VDIT Image To Video)",
    "VDITVAEDecode": "VAE Decode with VDIT Load VAE",
    "VDITLoraApply": "LoraLoaderModelOnly on VDIT Load Model",
    "VDITSaveVideo": "Create Video + Save Video",
}
for _name in REPLACED_BY:
    NODE_CLASS_MAPPINGS[_name].DEPRECATED = True

# words ComfyUI's node search also matches (newer ComfyUI publishes a node's SEARCH_ALIASES to the
# page; 0.3.64's frontend searches names and titles only)
SEARCH_ALIASES = {
    "VDITLoadModel": ["cogvideo", "cogvideox", "hunyuan", "hunyuandit", "open-sora", "opensora", "video model", "dit loader"],
    "VDITLoadVAE": ["vae", "video vae", "cogvideo vae", "hunyuan vae", "opensora vae"],
    "VDITPromptEncode": ["prompt", "text encode", "conditioning", "cogvideo prompt", "hunyuan prompt", "opensora prompt"],
    "VDITTextEncoderLoader": ["t5", "mt5", "text encoder", "clip loader", "hunyuan text encoder", "opensora text encoder"],
    "VDITEmptyLatentVideo": ["video", "empty video", "video latent", "video size", "cogvideo latent", "hunyuan latent", "opensora latent"],
    "VDITImageToVideo": ["image to video", "i2v", "video", "first frame", "cogvideo i2v", "opensora i2v"],
    "VDITSamplerSelect": ["sampler", "cogvideox dpm", "unipc"],
    "VDITDynamicCFGGuider": ["cfg", "guider", "dynamic cfg"],
    "VDITStepCache": ["cache", "step cache", "teacache", "speed up"],
}
for _name, _aliases in SEARCH_ALIASES.items():
    NODE_CLASS_MAPPINGS[_name].SEARCH_ALIASES = _aliases

NODE_DISPLAY_NAME_MAPPINGS = {
    "VDITLoadModel": "VDIT Load Model (Open-Sora, CogVideoX, HunyuanDiT)",  # (the frontend's search finds words in the first ~30 characters)
    "VDITLoadVAE": "VDIT Load VAE",
    "VDITPromptEncode": "VDIT Prompt Encode (conditioning)",
    "VDITEmptyLatentVideo": "VDIT Empty Latent Video",
    "VDITImageToVideo": "VDIT Image To Video (first frame)",
    "VDITSamplerSelect": "VDIT Sampler Select",
    "VDITDynamicCFGGuider": "VDIT Dynamic CFG Guider",
    "VDITStepCache": "VDIT Step Cache",
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
