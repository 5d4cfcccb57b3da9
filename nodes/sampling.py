"""Empty latents and the sampler node."""

from __future__ import annotations

import torch

from vdit_core.lora import load_lora
from vdit_core.pipeline import LATENT_PERMUTE
from vdit_core.sampling import SAMPLERS, SeededNoise

from . import comfy

SPACINGS = ["default", "trailing", "leading", "linspace", "karras", "exponential"]


def check_size(width: int, height: int, frames: int) -> str | None:
    """Why these sizes are invalid for CogVideoX (with the valid neighbours), or None."""
    if frames < 1 or (frames - 1) % 4:
        lo = max(1, (frames - 1) // 4 * 4 + 1)
        return f"frames={frames}: CogVideoX takes 4k+1 frames; nearest valid: {lo} or {lo + 4}"
    for label, v in (("width", width), ("height", height)):
        if v < 16 or v % 16:
            lo = max(16, v // 16 * 16)
            return f"{label}={v}: must be a positive multiple of 16; nearest valid: {lo} or {lo + 16}"
    return None


class VDITEmptyLatent:
    """Zero latents [B, C, T, H/8, W/8] shaped for the model (T padded for CogVideoX 1.5)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("VDIT_MODEL",),
            "width": ("INT", {"default": 720, "min": 16, "max": 4096, "step": 16}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
            "frames": ("INT", {"default": 49, "min": 1, "max": 1025, "step": 4}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "vdit"

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames):
        return check_size(width, height, frames) or True

    def generate(self, model, width, height, frames, batch_size):
        problem = check_size(width, height, frames)
        if problem:
            raise ValueError(problem)
        pipe = model.pipeline()
        pipe.check_size(frames, height, width)
        _, t_pad = pipe.latent_frames(frames)
        s = pipe.spatial_scale
        samples = torch.zeros(batch_size, pipe.config.out_channels, t_pad, height // s, width // s)
        return ({"samples": samples, "vdit_frames": frames},)


def _preview(denoised: torch.Tensor, scale: int):
    """A cheap look at the current x0 estimate: the middle latent frame's first three channels,
    each stretched to 0..255 (no VAE involved)."""
    from PIL import Image

    x = denoised[0, :3, denoised.shape[2] // 2].float()
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp(min=1e-6) * 255).byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(x)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def image_conditioning(image_latent: dict, t: int, out_channels: int) -> torch.Tensor:
    """I2V conditioning [B, C, T, h, w]: the first frame's latents, then zeros."""
    z = image_latent["samples"][:, :, :1].float()
    info = image_latent.get("vdit_vae", {})
    if info.get("invert_scale_latents"):  # CogVideoX 1.5 conditions on latents / scaling_factor
        z = z / info["scaling_factor"] ** 2
    if z.shape[1] != out_channels:
        raise ValueError(f"the image latent has {z.shape[1]} channels; this model's latents have {out_channels}")
    return torch.cat([z, z.new_zeros(z.shape[0], z.shape[1], t - 1, *z.shape[3:])], dim=2)


class VDITSampler:
    """Denoise latents with the model: progress in ComfyUI's bar, live previews, cancellable."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VDIT_MODEL",),
                "positive": ("VDIT_CONDITIONING",),
                "negative": ("VDIT_CONDITIONING",),
                "latent": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "sampler": (["default"] + list(SAMPLERS), {"default": "default", "tooltip": "default: the model's scheduler (DDIM for CogVideoX)"}),
                "schedule": (SPACINGS, {"default": "default", "tooltip": "timestep spacing (default: the model's, trailing)"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "below 1: video-to-video from the input latent"}),
            },
            "optional": {
                "image_latent": ("LATENT", {"tooltip": "image-to-video models: the first frame, from VDIT VAE Encode"}),
                "dynamic_cfg": ("BOOLEAN", {"default": False, "tooltip": "CogVideoX's dynamic guidance (recommended with cogvideox_dpm)"}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "vdit"

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, schedule, denoise, image_latent=None, dynamic_cfg=False):
        pipe = model.pipeline()
        x = latent["samples"]
        b, c, t = x.shape[:3]
        if c != pipe.config.out_channels:
            raise ValueError(f"the latent has {c} channels; {model.name} works on {pipe.config.out_channels} (use VDIT Empty Latent or a VDIT VAE)")
        pt = pipe.config.patch_size_t or 1
        if t % pt:
            raise ValueError(f"{model.name} needs a multiple of {pt} latent frames (VDIT Empty Latent pads them)")
        device = model.managed.load()
        context = positive["context"].to(device).expand(b, -1, -1)
        neg = negative["context"].to(device).expand(b, -1, -1) if cfg > 1.0 else None
        concat = None
        if pipe.is_i2v:
            if image_latent is None:
                raise ValueError(f"{model.name} is an image-to-video model: connect the first frame's latent to image_latent")
            concat = image_conditioning(image_latent, t, c).to(device).expand(b, -1, -1, -1, -1)
        source = SeededNoise(seed, x.shape, device=device, permute=LATENT_PERMUTE)
        n_steps = len(pipe.sigmas(steps, denoise, None if schedule == "default" else schedule)) - 1
        progress = comfy.Progress(n_steps, desc="vdit sampling")
        show = comfy.previews_enabled()

        def callback(info):
            comfy.check_interrupt()  # cancel stops within one step
            progress.update(1, _preview(info["denoised"], pipe.spatial_scale) if show else None)

        handles = [load_lora(pipe.transformer, path, strength) for path, strength in model.loras]
        try:
            with torch.no_grad():
                out = pipe.sample(
                    context, neg, source(), steps, cfg, None if sampler == "default" else sampler, source, denoise,
                    x.to(device) if denoise < 1.0 else None, concat, dynamic_cfg, callback, progress=False,
                    spacing=None if schedule == "default" else schedule,
                )
        finally:
            for h in handles:  # non-destructive: the loaded model is as it was
                h.detach()
            progress.close()
        result = {k: v for k, v in latent.items() if k != "samples"}
        result["samples"] = out.to(comfy.intermediate_device())
        return (result,)
