"""Empty latents and the sampler node."""

from __future__ import annotations

import math

import torch

from vdit_core import families
from vdit_core.lora import load_lora
from vdit_core.pipeline import check_finite
from vdit_core.sampling import SAMPLERS, SEED_MAX

from . import comfy

SPACINGS = ["default", "trailing", "leading", "linspace", "karras", "exponential", "linspace_round"]


def first_release() -> dict:
    """The facts of the first registered family's first release (CogVideoX 2B): the values a new
    node starts with (:func:`vdit_core.families.release_facts`)."""
    family = next(iter(families.FAMILIES.values()))
    return families.release_facts(family, next(iter(family.presets.values())))


def size_step() -> int:
    """The pixel step every family's size multiple is a multiple of (8 when one takes multiples of 8)."""
    return math.gcd(*(m for f in families.FAMILIES.values() if (m := f.size_multiple())))


def check_size(width: int, height: int, frames: int) -> str | None:
    """Why no registered family can make a video of this size (each family's reason, with its
    valid neighbours: the model is not known before the graph runs), or None. The model's own
    rules are checked when the node runs."""
    problems = {f.label: f.size_problem(frames, height, width, frames_label="frames") for f in families.FAMILIES.values()}
    if any(p is None for p in problems.values()):
        return None
    return "no model family takes this size: " + " | ".join(f"{label}: {p}" for label, p in problems.items())


def preset_conflict(width: int, height: int, frames: int, resolution: str, duration: str) -> str | None:
    """A preset and typed numbers that disagree (the node's page keeps them in step as they are
    edited; an API prompt or an edited file may not): which one is meant is not known, so the
    node refuses rather than ignore either."""
    w, h, f = apply_presets(width, height, frames, resolution, duration)
    if (w, h) != (width, height):
        return (f"resolution {resolution!r} is {w}x{h}, but width x height say {width}x{height}: set resolution to custom "
                f"to use your numbers, or them to {w}x{h}")
    if f != frames:
        return f"duration {duration!r} is {f} frames, but frames says {frames}: set duration to custom to use your number, or it to {f}"
    return None


def check_presets(resolution: str, duration: str) -> str | None:
    """A preset that is not among the node's (a workflow from another version)."""
    for name, value, choices in (("resolution", resolution, families.resolution_choices()), ("duration", duration, families.duration_choices())):
        if value != "custom" and value not in choices:
            return f"{name} {value!r}: not one of this node's presets (pick one from the list, or custom)"
    return None


def apply_presets(width: int, height: int, frames: int, resolution: str, duration: str) -> tuple[int, int, int]:
    """The size after the node's presets ("Open-Sora 360p 16:9 640x360", "Open-Sora 2s (51 frames)")."""
    if resolution != "custom":
        width, height = (int(v) for v in resolution.rsplit(" ", 1)[1].split("x"))
    if duration != "custom":
        frames = int(duration.rsplit("(", 1)[1].split()[0])
    return width, height, frames


class VDITEmptyLatent:
    """Zero latents [B, C, T, h, w] shaped for the model (T padded as its family needs)."""

    @classmethod
    def INPUT_TYPES(cls):
        first, step = first_release(), size_step()
        multiple = f"pixels, a multiple of the model's size step ({families.quote('size_multiple')})"
        return {"required": {
            "model": ("VDIT_MODEL", {"tooltip": "the model the latents are shaped for (channels, frame padding)"}),
            "width": ("INT", {"default": first["width"], "min": step, "max": 4096, "step": step, "tooltip": multiple}),
            "height": ("INT", {"default": first["height"], "min": step, "max": 4096, "step": step, "tooltip": multiple}),
            "frames": ("INT", {"default": first["frames"], "min": 1, "max": 1025, "step": 1,
                               "tooltip": f"video frames, a count the model takes ({families.quote('frame_rule')}); release defaults: {families.quote('frames')}"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "videos made at once; sample b uses seed + b"}),
        }, "optional": {
            "resolution": (["custom"] + families.resolution_choices(), {"default": "custom", "tooltip": "a size a release was trained at (replaces width and height); custom: the width and height above"}),
            "duration": (["custom"] + families.duration_choices(), {"default": "custom", "tooltip": "a release's named length (replaces frames); custom: the frames above"}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = "Empty latents for text-to-video or text-to-image with a video DiT: the size and frame count checked against the model."
    CATEGORY = "vdit"

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, frames, resolution="custom", duration="custom"):
        # (declaring the presets here skips ComfyUI's own check of their values: done here)
        return check_presets(resolution, duration) or check_size(*apply_presets(width, height, frames, resolution, duration)) or True

    def generate(self, model, width, height, frames, batch_size, resolution="custom", duration="custom"):
        width, height, frames = apply_presets(width, height, frames, resolution, duration)
        pipe = model.pipeline()  # the model's own rules: its one-line reason and valid neighbours
        pipe.check_size(frames, height, width)
        samples = torch.zeros(pipe.latent_shape(frames, height, width, batch_size))
        return ({"samples": samples, "vdit_frames": frames},)


# the INT output that goes with a LATENT, in the style of ComfyUI's own video nodes (e.g. the Wan
# VACE node's trim_latent): latent frames a family adds in front that are not part of the video
TRIM_TOOLTIP = ("latent frames added in front of the video (CogVideoX 1.5 pads an odd latent count to its temporal patch, as its "
                "release does; 0 for every other model): connect to ComfyUI's TrimVideoLatent after the sampler, so that VAE Decode "
                "returns exactly the requested frames")


class VDITEmptyLatentVideo:
    """Zero latents [B, C, T, h, w] shaped for a ComfyUI MODEL of a vdit family (KSampler's input)."""

    @classmethod
    def INPUT_TYPES(cls):
        spec = VDITEmptyLatent.INPUT_TYPES()
        spec["required"]["model"] = ("MODEL", {"tooltip": "the model the latents are shaped for (VDIT Load Model: channels, frame rule, size step)"})
        for name, numbers in (("resolution", "width and height"), ("duration", "frames")):
            kind, opts = spec["optional"][name]
            spec["optional"][name] = (kind, {**opts, "tooltip": f"{opts['tooltip'].split(' (')[0]}: picking one writes its {numbers} above; typing "
                                                                f"another number there sets it back to custom (the two never disagree)"})
        return spec

    RETURN_TYPES = ("LATENT", "INT")
    RETURN_NAMES = ("latent", "trim_latent")
    OUTPUT_TOOLTIPS = ("empty latents for KSampler", TRIM_TOOLTIP)
    FUNCTION = "generate"
    DESCRIPTION = ("Empty latents for text-to-video or text-to-image with a video DiT, for KSampler: the size and frame count checked "
                   "against the model's family (frame rule, size step) before anything runs.")
    CATEGORY = "vdit"

    @classmethod
    def VALIDATE_INPUTS(cls, resolution="custom", duration="custom"):
        # Only the presets: ComfyUI repeats a message once per input this declares, and the size
        # rules are the connected model's, which the node states (once) when it runs.
        # (declaring the presets here skips ComfyUI's own check of their values: done here)
        return check_presets(resolution, duration) or True

    def generate(self, model, width, height, frames, batch_size, resolution="custom", duration="custom"):
        from . import native

        inner = native.vdit_model(model)
        conflict = preset_conflict(width, height, frames, resolution, duration)
        if conflict:
            raise ValueError(conflict)
        width, height, frames = apply_presets(width, height, frames, resolution, duration)
        family, config, scale = inner.vdit_family, inner.vdit_config, inner.vdit_spatial_scale
        problem = family.size_problem(frames, height, width, config, scale, frames_label="frames")
        if problem:
            raise ValueError(f"{inner.vdit_name}: {problem}")
        keep, t = family.latent_frames(config, frames)
        samples = torch.zeros(batch_size, family.latent_channels(config), t, height // scale, width // scale)
        return {"samples": samples, "vdit_frames": frames}, t - keep


class VDITImageToVideo:
    """Image-to-video in ComfyUI's native style: the first frame, encoded, goes into both prompts'
    conditioning, and empty latents of the video's size come out for KSampler."""

    @classmethod
    def INPUT_TYPES(cls):
        first = first_release()
        step = size_step()
        return {"required": {
            "model": ("MODEL", {"tooltip": "an image-to-video model (VDIT Load Model): CogVideoX I2V, or Open-Sora (a first frame is optional there)"}),
            "positive": ("CONDITIONING", {"tooltip": "the prompt (VDIT Prompt Encode)"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative prompt (VDIT Prompt Encode)"}),
            "vae": ("VAE", {"tooltip": "the model's VAE (VDIT Load VAE): encodes the first frame"}),
            "start_image": ("IMAGE", {"tooltip": "the first frame; resized (centre crop) to width x height"}),
            "width": ("INT", {"default": first["width"], "min": step, "max": 4096, "step": step, "tooltip": "the video's width in pixels"}),
            "height": ("INT", {"default": first["height"], "min": step, "max": 4096, "step": step, "tooltip": "the video's height in pixels"}),
            "frames": ("INT", {"default": first["frames"], "min": 1, "max": 1025, "tooltip": f"video frames ({families.quote('frame_rule')})"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "videos made at once"}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "INT")
    RETURN_NAMES = ("positive", "negative", "latent", "trim_latent")
    OUTPUT_TOOLTIPS = ("the prompt with the first frame", "the negative prompt with the first frame", "empty latents for KSampler", TRIM_TOOLTIP)
    FUNCTION = "encode"
    DESCRIPTION = ("Image to video for KSampler: encodes the first frame with the model's VAE into the conditioning (CogVideoX I2V "
                   "reads it beside the noise; Open-Sora holds it as the video's first frames) and makes the video's empty latents.")
    CATEGORY = "vdit"

    def encode(self, model, positive, negative, vae, start_image, width, height, frames, batch_size):
        from vdit_core.pipeline import frames_conditioning
        from vdit_core.vae.common import frames_to_pixels

        from . import native

        inner = native.vdit_model(model)
        family, config, scale = inner.vdit_family, inner.vdit_config, inner.vdit_spatial_scale
        if not family.takes_image(config):
            raise ValueError(f"{inner.vdit_name} is a text-to-video model; image to video needs an image-to-video model (e.g. CogVideoX-5b-I2V)")
        problem = family.size_problem(frames, height, width, config, scale, frames_label="frames")
        if problem:
            raise ValueError(f"{inner.vdit_name}: {problem}")
        check_finite("start_image", start_image)
        image = native.resized(start_image[:1], width, height)  # [1, H, W, 3]
        z = native.encode_scaled(vae, frames_to_pixels(image), lambda info: family.image_latent_scale(info))  # [1, C, 1, h, w]
        keep, t = family.latent_frames(config, frames)
        inputs = frames_conditioning(family, config, z.float().to(comfy.intermediate_device()), t)
        latent = torch.zeros(batch_size, family.latent_channels(config), t, height // scale, width // scale)
        return native.with_inputs(positive, inputs), native.with_inputs(negative, inputs), {"samples": latent, "vdit_frames": frames}, t - keep


def _preview(denoised: torch.Tensor, scale: int, latent_rgb=None):
    """A cheap look at the current x0 estimate, as an RGB image (ComfyUI sends previews as JPEG):
    the middle latent frame through the family's latent -> RGB projection when it has one, else
    its first three channels (the last repeated when there are fewer), each stretched to 0..255."""
    from PIL import Image

    z = denoised[0, :, denoised.shape[2] // 2].float()  # [C, h, w]
    if latent_rgb is not None and len(latent_rgb[0]) == z.shape[0]:
        factors, bias = (torch.tensor(v, dtype=torch.float32, device=z.device) for v in latent_rgb)
        rgb = torch.einsum("chw,cr->rhw", z, factors) + bias[:, None, None]  # [3, h, w] in about [-1, 1]
        x = ((rgb + 1) / 2).clamp(0, 1) * 255
    else:
        x = z[:3]
        x = torch.cat([x, x[-1:].expand(3 - x.shape[0], -1, -1)])  # [3, h, w]
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-6) * 255
    img = Image.fromarray(x.round().byte().permute(1, 2, 0).cpu().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


class VDITSampler:
    """Denoise latents with the model: progress in ComfyUI's bar, live previews, cancellable."""

    @classmethod
    def INPUT_TYPES(cls):
        first = first_release()
        return {
            "required": {
                "model": ("VDIT_MODEL", {"tooltip": "the diffusion transformer (with any LoRAs applied)"}),
                "positive": ("VDIT_CONDITIONING", {"tooltip": "what the video or image should show (VDIT Text Encode)"}),
                "negative": ("VDIT_CONDITIONING", {"tooltip": "what it should not show; used when cfg > 1"}),
                "latent": ("LATENT", {"tooltip": "VDIT Empty Latent, or encoded frames (VDIT VAE Encode) with denoise below 1"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": "the noise seed; the same seed gives the same result"}),
                "steps": ("INT", {"default": first["steps"], "min": 1, "max": 1000, "tooltip": f"sampling steps (release defaults: {families.quote('steps')})"}),
                "cfg": ("FLOAT", {"default": float(first["cfg"]), "min": 0.0, "max": 100.0, "step": 0.1,
                                  "tooltip": f"classifier-free guidance: how strongly to follow the prompt (1 turns it off; release defaults: {families.quote('cfg')})"}),
                "sampler": (["default"] + list(SAMPLERS), {"default": "default",
                                                            "tooltip": f"default: the model folder's scheduler, else its release's ({families.quote('sampler')})"}),
                "schedule": (SPACINGS, {"default": "default", "tooltip": "timestep spacing (default: what the model's release uses with the chosen sampler)"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "below 1: video-to-video from the input latent"}),
            },
            "optional": {
                "image_latent": ("LATENT", {"tooltip": "image-to-video: the first frame, from VDIT VAE Encode (CogVideoX I2V needs it; " + "; ".join(f"{f.label} takes it optionally, or an encoded clip to continue: its last {f.extension_frames} frames start the video" for f in families.FAMILIES.values() if f.extends_videos) + ")"}),
                "dynamic_cfg": ("BOOLEAN", {"default": False, "tooltip": "CogVideoX's dynamic guidance (recommended with cogvideox_dpm)"}),
                "step_cache": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "faster, slightly different: skip the transformer on steps whose input changed by less than this in total, reusing the last computed change (0: off; 0.08-0.1: mild)"}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = ("The video sampler: denoises latents with a video diffusion transformer (CogVideoX text-to-video, "
                   "image-to-video, video-to-video; HunyuanDiT text-to-image, image-to-image; Open-Sora text-to-video, "
                   "image-to-video, video extension, video-to-video), with live previews.")
    CATEGORY = "vdit"

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, schedule, denoise, image_latent=None, dynamic_cfg=False,
               step_cache=0.0):
        pipe = model.pipeline()
        x = latent["samples"]
        problem = pipe.family.latent_problem(pipe.config, x)
        if problem:
            raise ValueError(f"{model.name}: {problem} (use VDIT Empty Latent or a VDIT VAE)")
        for name, c in (("positive", positive), ("negative", negative)):
            if c.get("family", pipe.family.name) != pipe.family.name:
                label = families.get(c["family"]).label
                raise ValueError(f"{name}: encoded for {label}, but the model is {pipe.family.label}: set the text encoder loader's family to {pipe.family.name}")
        frames = _frame_latents(model.name, pipe, image_latent)  # checked before anything is loaded
        device = model.managed.load()
        request = pipe.prepare(
            cond=positive["cond"], uncond=negative["cond"], latents=x, seed=seed, steps=steps, cfg=cfg,
            sampler=None if sampler == "default" else sampler, spacing=None if schedule == "default" else schedule,
            denoise=denoise, dynamic_cfg=dynamic_cfg, frame_latents=frames,
        )
        progress = comfy.Progress(len(request.sigmas) - 1, desc=f"vdit {request.mode}")
        show = comfy.previews_enabled()

        def callback(info):
            comfy.check_interrupt()  # cancel stops within one step
            progress.update(1, _preview(info["denoised"], pipe.spatial_scale, pipe.latent_rgb) if show else None)

        handles = [load_lora(pipe.transformer, path, strength) for path, strength in model.loras]
        try:
            with torch.no_grad():
                out = pipe.run(request, callback, progress=False, step_cache=step_cache)
        finally:
            for h in handles:  # non-destructive: the loaded model is as it was
                h.detach()
            progress.close()
        result = {k: v for k, v in latent.items() if k != "samples"}
        result["samples"] = out.to(comfy.intermediate_device())
        return (result,)


def _frame_latents(name: str, pipe, image_latent: dict | None) -> torch.Tensor | None:
    """The image_latent input in the family's scaling (VDIT VAE Encode's latents carry the VAE's
    own), after checking the model takes it."""
    if pipe.is_i2v and (image_latent is None or "vdit_vae" not in image_latent):
        raise ValueError(f"{name} is an image-to-video model: connect the first frame's latent (from VDIT VAE Encode) to image_latent")
    if image_latent is None:
        return None
    if not pipe.family.takes_image(pipe.config):
        raise ValueError(f"{name} takes no image: disconnect image_latent (for video-to-video, connect the encoded clip to latent with denoise below 1)")
    if "vdit_vae" not in image_latent:
        raise ValueError("image_latent: connect the output of VDIT VAE Encode (it carries the VAE's scaling)")
    info = image_latent["vdit_vae"]
    return check_finite("the image latent", image_latent["samples"].float()) * (pipe.family.image_latent_scale(info) / info["scaling_factor"])
