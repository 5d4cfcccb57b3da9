"""Prompt -> conditioning."""

from __future__ import annotations

import torch

from . import comfy


class VDITTextEncode:
    """Encode a prompt with the T5 encoder (one node per prompt: positive and negative are two)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("VDIT_TEXT_ENCODER",),
            "text": ("STRING", {"multiline": True, "default": ""}),
        }}

    RETURN_TYPES = ("VDIT_CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "vdit"

    def encode(self, text_encoder, text):
        text_encoder.managed.load()
        with torch.no_grad():
            context = text_encoder.encoder.encode(text)
        return ({"context": context.to(comfy.intermediate_device()), "text": text},)
