"""Prompt -> conditioning."""

from __future__ import annotations

import torch

from vdit_core import families

from . import comfy


class VDITTextEncode:
    """Encode a prompt with the model's text encoder(s) (one node per prompt: positive and negative are two)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("VDIT_TEXT_ENCODER", {"tooltip": "from VDIT Text Encoder Loader"}),
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "the prompt. " + "; ".join(f"{f.label}: {f.prompt_note}" for f in families.FAMILIES.values() if f.prompt_note)}),
        }}

    RETURN_TYPES = ("VDIT_CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes a prompt for a video/image DiT (text to video, text to image); use one node for the positive and one for the negative prompt."
    CATEGORY = "vdit"

    def encode(self, text_encoder, text):
        text_encoder.managed.load()
        with torch.no_grad():
            cond = text_encoder.family.encode_text(text_encoder.encoder, text)
        return ({"cond": {k: v.to(comfy.intermediate_device()) for k, v in cond.items()}, "text": text, "family": text_encoder.family.name},)


class VDITPromptEncode:
    """Encode a prompt as ComfyUI CONDITIONING (KSampler, the Conditioning nodes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return VDITTextEncode.INPUT_TYPES()

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = ("Encodes a prompt for a video/image DiT as ComfyUI conditioning, for KSampler and ComfyUI's conditioning nodes "
                   "(Combine, Zero Out, Set Timestep Range); use one node for the positive and one for the negative prompt.")
    CATEGORY = "vdit"

    def encode(self, text_encoder, text):
        from . import native

        text_encoder.managed.load()
        with torch.no_grad():
            cond = text_encoder.family.encode_text(text_encoder.encoder, text)
        cond = {k: v.to(comfy.intermediate_device()) for k, v in cond.items()}
        return (native.conditioning(text_encoder.family, cond),)
