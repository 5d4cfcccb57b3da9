"""VAE encode (IMAGE -> LATENT) and decode (LATENT -> IMAGE)."""

from __future__ import annotations

import torch

from vdit_core import families
from vdit_core.pipeline import check_finite
from vdit_core.vae.common import Tiling, frames_to_pixels, pixels_to_frames

from . import comfy

TILING = ["auto", "off", "on"]
STEPS = 100  # progress bar positions per decoded video (chunks and tiles vary with memory)


def _tiling(vae, mode: str, tile_height: int, tile_width: int) -> Tiling | None:
    if mode == "off":
        return None
    default = vae.default_tiling()
    return Tiling(tile_height or default.tile_height, tile_width or default.tile_width)


def _tile_inputs():
    return {
        "tiling": (TILING, {"default": "auto", "tooltip": "auto: tiles sized from the free memory (untiled when it fits), retried with the default tiles if memory still runs out"}),
        "tile_height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "0: half the model's trained height"}),
        "tile_width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "0: half the model's trained width"}),
    }


def _run(fn, vae, mode, tile_height, tile_width, frames: int, height: int, width: int):
    """Run with tiles as asked; "auto": tiles sized from the free memory (untiled when it fits),
    and on out-of-memory, free memory and retry with the default tiles (or half the sized ones)."""
    if mode == "on":
        tiling = _tiling(vae, mode, tile_height, tile_width)
    elif mode == "auto":
        tiling = vae.auto_tiling(frames, height, width)
    else:
        tiling = None
    try:
        return fn(tiling)
    except torch.OutOfMemoryError:
        if mode != "auto":
            raise
    # retried only now: inside the except block the exception's traceback still holds the failed
    # attempt's frames, and with them its GPU tensors (activations, convolution caches)
    comfy.free_cache()
    if tiling is None:
        return fn(_tiling(vae, "on", tile_height, tile_width))
    s = vae.spatial_compression  # the sized tiles were too big after all: halve them
    return fn(Tiling(max(2 * s, tiling.tile_height // 2 // s * s), max(2 * s, tiling.tile_width // 2 // s * s),
                     tiling.overlap_height, tiling.overlap_width))


class VDITVAEEncode:
    """Frames (IMAGE [F, H, W, 3], a count the VAE takes: its model's frame rule, or 1) -> latents; for image-to-video, encode one frame."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VDIT_VAE", {"tooltip": "from VDIT VAE Loader"}),
            "pixels": ("IMAGE", {"tooltip": f"frames to encode: a count the model's VAE takes ({families.quote('frame_rule')}), or 1: a first frame or an image"}),
            "chunk_frames": ("INT", {"default": 8, "min": 4, "max": 256, "step": 4, "tooltip": "frames encoded at a time (memory)"}),
            **_tile_inputs(),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes frames or an image into latents with a video/image DiT's VAE: the first frame for image-to-video, a clip for video-to-video."
    CATEGORY = "vdit"

    def encode(self, vae, pixels, chunk_frames, tiling, tile_height, tile_width):
        f = pixels.shape[0]
        problem = vae.vae.frames_problem(f)
        if problem:
            raise ValueError(problem)
        check_finite("the input images", pixels)
        device = vae.managed.load()
        video = frames_to_pixels(pixels.to(device))  # [1, 3, F, H, W]
        with torch.no_grad():
            z = _run(lambda t: vae.vae.encode(video, chunk_frames=chunk_frames, tiling=t), vae.vae, tiling, tile_height, tile_width,
                     f, *video.shape[-2:])
        return ({"samples": z.to(comfy.intermediate_device()), "vdit_vae": vae.vae.info(), "vdit_frames": f},)


class VDITVAEDecode:
    """Latents -> frames (IMAGE [F, H, W, 3]), decoded chunk by chunk along time and moved off the
    GPU as they are made, so long videos fit wherever one chunk does."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VDIT_VAE", {"tooltip": "from VDIT VAE Loader"}),
            "samples": ("LATENT", {"tooltip": "latents from VDIT Sampler or VDIT VAE Encode"}),
            "chunk_frames": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "latent frames decoded at a time (memory)"}),
            **_tile_inputs(),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = "Decodes latents into video frames (or an image), chunk by chunk in time, tiled when memory runs short."
    CATEGORY = "vdit"

    def decode(self, vae, samples, chunk_frames, tiling, tile_height, tile_width):
        z = check_finite("the latent", samples["samples"])
        if "vdit_frames" in samples:  # drop the padding frames a family adds in front, as the references do
            z = z[:, :, -vae.vae.latent_frames(samples["vdit_frames"]):]
        device = vae.managed.load()
        out_device = comfy.intermediate_device()
        videos = []
        bar = comfy.Progress(z.shape[0] * STEPS, desc="vdit decoding")
        try:
            with torch.no_grad():
                for i in range(z.shape[0]):
                    zz = z[i : i + 1].to(device)
                    s = vae.vae.spatial_compression

                    def progress(done, total, i=i):  # each chunk: cancel stops here; the bar moves (a retry starts the video over)
                        comfy.check_interrupt()
                        bar.update_to(i * STEPS + done * STEPS // total)

                    video = _run(lambda t: vae.vae.decode(zz, chunk_frames=chunk_frames, tiling=t, output_device=out_device, progress=progress),
                                 vae.vae, tiling, tile_height, tile_width, vae.vae.pixel_frames(zz.shape[2]), zz.shape[3] * s, zz.shape[4] * s)
                    videos.append(pixels_to_frames(video[0]))
        finally:
            bar.close()
        return (torch.cat(videos).to(out_device),)
