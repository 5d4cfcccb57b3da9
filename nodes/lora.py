"""LoRA apply: the core's LoRA, attached only while sampling."""

from __future__ import annotations

from vdit_core.lora import read_lora

from . import comfy


class VDITLoraApply:
    """Add a LoRA (ours, ComfyUI, diffusers/PEFT or kohya keys) to a model. Chainable and
    non-destructive: the input model is untouched; a LoRA for another model is an error."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("VDIT_MODEL", {"tooltip": "the model to add the LoRA to (it is left unchanged)"}),
            "lora_name": (comfy.list_files("loras"), {"tooltip": "a LoRA file in models/loras (ours, ComfyUI, diffusers/PEFT, kohya, Tencent's HunyuanDiT)"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "1: the trained effect; 0: none; negative values invert it"}),
        }}

    RETURN_TYPES = ("VDIT_MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = "Applies a LoRA to a video/image DiT model while sampling; chain several to stack them. The loaded model is never changed."
    CATEGORY = "vdit"

    def apply(self, model, lora_name, strength):
        path = comfy.full_path("loras", lora_name)
        read_lora(path, model.transformer)  # checks the file against this model now, not at sampling
        return (model.with_lora(path, strength),)
