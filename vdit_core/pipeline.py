"""Text/image/video-to-video for every model family: the API the CLI, the ComfyUI nodes and the
trainer's validation use.

    pipe = vdit_core.load_pipeline("path/to/CogVideoX-5b", device="cuda", dtype=torch.bfloat16)
    frames = pipe(prompt="a cat", num_frames=49, steps=50, cfg=6.0, seed=0)  # [F, H, W, 3] in [0, 1]

The pipeline is generic: the model folder's family (:mod:`vdit_core.families`) supplies the
loaders, the frame and size rules, the noise layout, the prediction type, the schedule defaults
and how conditioning is assembled. Conditioning is a dict (hidden states, masks, image latents)
from the text encoder to the transformer. An image is a one-frame video.

A seed reproduces the reference pipeline run with ``torch.Generator().manual_seed(seed)``: noise
is drawn in the same order and layout as the reference (the family's ``noise_permute``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import families
from .attention import resolve_backend
from .checkpoint import CheckpointError, parse_dtype
from .fp8 import check_support as check_fp8, compute_dtype, quantize
from .guidance import CFGDenoiser
from .lora import load_lora, unload_loras
from .offload import BlockSwap, check_block_swap
from .memory import available_bytes, fmt_bytes
from .sampling import SAMPLERS, STOCHASTIC_SAMPLERS, SeededNoise
from .step_cache import StepCache
from .vae.common import VideoVAE, frames_bytes, frames_to_pixels, image_tensor, pixels_to_frames


def network_call(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """The bare network as samplers and the trainer call it: float32 output whatever its dtype."""
    return transformer(x, t, **cond).float()


def check_request(num_frames: int | None = None, height: int | None = None, width: int | None = None,
                  steps: int | None = None, cfg: float | None = None, denoise: float = 1.0, step_cache: float = 0.0) -> None:
    """Refuse nonsense numbers before any work (None means "the model's default"): counts and sizes
    below 1, a guidance scale that is not a finite number >= 0, a denoise outside (0, 1]."""
    for name, v, example in (("num_frames", num_frames, 49), ("height", height, 480), ("width", width, 720), ("steps", steps, 50)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name}={v!r}: must be a whole number of at least 1 (e.g. {example}); leave it unset for the model's default")
    if cfg is not None and not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f"cfg={cfg}: the guidance scale must be a finite number >= 0 (1 turns guidance off; 6 is typical)")
    if not (0.0 < denoise <= 1.0):
        raise ValueError(f"denoise={denoise}: must be in (0, 1] (1: from pure noise)")
    if not (math.isfinite(step_cache) and step_cache >= 0):
        raise ValueError(f"step_cache={step_cache}: must be a number >= 0 (0 turns step caching off; 0.1 is a mild setting)")


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Refuse inputs holding NaN or infinite values (they would silently give NaN frames)."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def batch_conditioning(cond: dict, batch: int) -> dict:
    """Conditioning of batch 1 expanded to ``batch`` samples (views, no copies)."""
    return {k: v.expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v for k, v in cond.items()}


def frames_conditioning(family: families.Family, config, latents: torch.Tensor, latent_t: int) -> dict[str, torch.Tensor]:
    """Conditioning on given frames for ``latent_t`` latent frames, from their latents [B, C, T', h, w]
    (scaled by :meth:`Family.image_latent_scale`): a clip to continue for families that extend
    videos (T' > 1), else the first frame."""
    z = check_finite("the image latent", latents.float())
    if continues_clip(family, z):
        return family.video_conditioning(config, z, latent_t)
    return family.image_conditioning(config, z[:, :, :1], latent_t)


def continues_clip(family: families.Family, latents: torch.Tensor) -> bool:
    """Whether frame latents [B, C, T', h, w] are a clip the family continues (else their first
    frame conditions)."""
    return latents.shape[2] > 1 and family.extends_videos


@dataclass(frozen=True)
class Request:
    """A generation request made ready to sample by :meth:`Pipeline.prepare`: nothing is left to
    decide or check. :meth:`Pipeline.run` samples it."""

    mode: str  # "text-to-video", "image-to-video", "video extension" or "video-to-video" (images: one-frame videos)
    shape: tuple[int, ...]  # the latents' [B, C, T, h, w], T padded as the transformer needs
    keep: int  # latent frames the result keeps: the last ``keep`` (the family pads in front)
    sampler: str  # a key of vdit_core.sampling.SAMPLERS
    sigmas: torch.Tensor  # noise levels from the first step's to 0 (fewer than steps + 1 with denoise < 1)
    guidance: float | Callable | None  # the CFG scale (a function of sigma for dynamic CFG); None: unguided
    cond: dict[str, torch.Tensor]  # the transformer's inputs besides x and t, batched like the latents
    uncond: dict[str, torch.Tensor] | None  # the unconditional branch's (None: unguided)
    noise: torch.Tensor  # the initial noise [B, C, T, h, w]
    noise_source: Callable | None  # more noise for stochastic samplers (None: the sampler's own)
    init_latents: torch.Tensor | None = None  # video-to-video: the latents noised to sigmas[0] to start from

    def crop(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents without the family's padding frames in front."""
        return latents[:, :, latents.shape[2] - self.keep :]


@dataclass
class Pipeline:
    """A diffusion transformer with its VAE, text encoder and noise schedule, driven by its family.

    Each component is usable on its own: ``pipe.transformer``, ``pipe.vae`` (``encode``/
    ``decode``), ``pipe.text_encoder``. ``family`` is found from the transformer when not given.
    """

    transformer: nn.Module | None
    vae: VideoVAE | None
    text_encoder: object | None
    schedule: object
    sampler: str | None = None  # None, here and below: the family's release default
    steps: int | None = None
    cfg: float | None = None
    name: str = ""
    vae_scale: int | None = None  # pixels per latent cell when no VAE is loaded (the folder's VAE config says)
    family: families.Family | None = None
    latent_rgb: tuple | None = None  # latent -> RGB preview factors (default: the family's)
    last_step_cache: StepCache | None = None  # the last sampling run's step cache (computed/skipped counts)
    parallel: object | None = None  # a vdit_core.parallel.Parallel when several processes share the run (set by parallel.enable)

    def __post_init__(self):
        if self.family is None:
            if self.transformer is None:
                raise ValueError("a pipeline without a transformer needs its family")
            self.family = families.for_transformer(self.transformer)
        self.name = self.name or self.family.name
        unset = [k for k in ("sampler", "steps", "cfg", "vae_scale") if getattr(self, k) is None]
        if unset:
            if self.transformer is None:
                raise ValueError(f"a pipeline without a transformer needs its {', '.join(unset)}")
            release = self.family.sampling_defaults(None, self.transformer.config)
            for k in unset:
                setattr(self, k, release[k])
        self.latent_rgb = self.latent_rgb or self.family.latent_rgb

    # -- facts about the model (the family's) ---------------------------------------------------
    @property
    def config(self):
        if self.transformer is None:
            raise ValueError("this pipeline has no transformer loaded")
        return self.transformer.config

    @property
    def fps(self) -> float:
        return self.family.fps(self.config)

    @property
    def is_i2v(self) -> bool:
        return self.family.is_image_to_video(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent cell: the VAE's spatial compression."""
        return self.vae.spatial_compression if self.vae is not None else self.vae_scale

    @property
    def default_size(self) -> tuple[int, int, int]:
        """(frames, height, width) the model was trained at."""
        return self.family.default_size(self.config, self.spatial_scale)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.config)

    def latent_frames(self, num_frames: int) -> tuple[int, int]:
        """(latent frames, padded for the transformer) for a pixel frame count."""
        return self.family.latent_frames(self.config, num_frames)

    def latent_shape(self, num_frames: int, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
        s = self.spatial_scale
        return (batch, self.latent_channels, self.latent_frames(num_frames)[1], height // s, width // s)

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError for sizes the model cannot take (naming valid neighbours); warn for
        sizes unlike the release's training."""
        problem = self.family.size_problem(num_frames, height, width, self.config, self.spatial_scale)
        if problem:
            raise ValueError(problem)
        warning = self.family.size_warning(num_frames, height, width, self.config, self.spatial_scale)
        if warning:
            warnings.warn(warning, stacklevel=3)

    def memory_estimate(self, num_frames: int, height: int, width: int, batch: int = 1, guidance: bool = True) -> dict[str, int]:
        """Rough bytes a generation needs beyond the loaded weights, by part: latents and sampler
        state, the transformer's activations (the CFG pair in one batch), the VAE decode."""
        shape = self.latent_shape(num_frames, height, width, batch)
        out = {"latents": 8 * math.prod(shape) * 4}
        passes = ((2 if guidance else 1) * shape[0], *shape[1:])  # the CFG pair in one batch
        activations = self.family.activation_bytes(self.config, passes, compute_dtype(self.transformer))
        if activations is not None:
            out["transformer"] = activations
        if self.vae is not None:
            # decoding tiles itself to the free memory (tiling_for_memory): count its smallest tiles and the frames
            small = self.vae.tiling_for_memory(num_frames, height, width, 0)  # free 0: the smallest tiles
            tiled = self.vae.decode_bytes(num_frames, small.tile_height, small.tile_width) + frames_bytes(num_frames, height, width)
            out["vae decode"] = min(self.vae.decode_bytes(num_frames, height, width), tiled)
        return out

    def check_memory(self, num_frames: int, height: int, width: int, guidance: bool = True) -> None:
        """Refuse a request whose estimate exceeds the device's free memory, saying the estimate
        and the largest frame count and size (same aspect) that fit; ``check_memory=False`` in
        the call (``--no-memory-check``) skips this for who knows better."""
        free = available_bytes(self.device)
        if free is None:
            return
        need = self.memory_estimate(num_frames, height, width, guidance=guidance)
        if sum(need.values()) <= free:
            return
        fits = lambda f, h, w: sum(self.memory_estimate(f, h, w, guidance=guidance).values()) <= free  # noqa: E731
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in need.items())
        hints = []
        frames = [f for f in range(num_frames, 0, -1) if self.family.size_problem(f, height, width, self.config, self.spatial_scale) is None]
        lo, hi = 0, len(frames)  # frames is descending; find the first (largest) that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(frames[mid], height, width):
                hi = mid
            else:
                lo = mid + 1
        if lo < len(frames):
            hints.append(f"{frames[lo]} frames at {width}x{height}")
        for scale in (0.75, 0.5, 0.35, 0.25, 0.125, 0.0625, 0.03125, 0.015625):
            h, w = self._round_size(height * scale), self._round_size(width * scale)
            if h and w and fits(num_frames, h, w):
                hints.append(f"{w}x{h} at {num_frames} frames")
                break
        raise ValueError(
            f"{num_frames} frames at {width}x{height} need about {fmt_bytes(sum(need.values()))} ({parts}) but "
            f"{self.device.type} has {fmt_bytes(free)} free; what fits: {' or '.join(hints) or 'a smaller request'} "
            "(check_memory=False / --no-memory-check tries anyway)"
        )

    def _round_size(self, v: float) -> int:
        """The largest valid size at or below ``v`` (0 when none)."""
        step = self.spatial_scale
        for cand in range(int(v) // step * step, 0, -step):
            if self.family.size_problem(self.default_size[0], cand, cand, None, self.spatial_scale) is None:
                return cand
        return 0

    # -- LoRA --------------------------------------------------------------------------------
    def load_lora(self, path, strength: float = 1.0):
        """Attach a LoRA file to the transformer (non-destructive; several stack)."""
        return load_lora(self.transformer, path, strength)

    def unload_loras(self) -> None:
        """Detach every LoRA: outputs are exactly the base model's again."""
        unload_loras(self.transformer)

    # -- conditioning ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str], **options) -> dict[str, torch.Tensor]:
        """The conditioning dict of a prompt (hidden states, masks), as the transformer takes it;
        ``options``: the family's prompt options (Open-Sora: ``aesthetic_score``, ``motion_score``)."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder loaded")
        self.family.check_options(options)
        return self.family.encode_text(self.text_encoder, prompt, **options)

    def noise_source(self, seed: int, latent_shape: tuple[int, ...]) -> SeededNoise:
        """The run's noise stream, drawing latents in the reference layout."""
        return SeededNoise(seed, latent_shape, device=self.device, permute=self.family.noise_permute)

    def encode_first_frame(self, image, height: int, width: int, noise: SeededNoise) -> torch.Tensor:
        """Latents [1, C, 1, h, w] of a first frame (a posterior sample), scaled as the family
        conditions on them (:meth:`Family.image_latent_scale`)."""
        if self.vae is None:
            raise ValueError("image-to-video needs the VAE")
        pixels = frames_to_pixels(image_tensor(image), height, width).to(self.vae.device)
        s = self.spatial_scale
        post = noise.draw((1, self.vae.latent_channels, 1, height // s, width // s))
        z = self.vae.encode(pixels, sample=True, noise=post, scale=self.family.image_latent_scale(self.vae.info()))
        return z.to(self.device)

    def encode_image(self, image, height: int, width: int, latent_t: int, noise: SeededNoise) -> dict[str, torch.Tensor]:
        """Image-to-video conditioning from the first frame, for ``latent_t`` latent frames."""
        return self.family.image_conditioning(self.config, self.encode_first_frame(image, height, width, noise), latent_t)

    def encode_video(self, video: torch.Tensor, height: int, width: int, noise: SeededNoise) -> torch.Tensor:
        """Video-to-video: sampled latents of frames [F, H, W, 3] in [0, 1]."""
        if self.vae is None:
            raise ValueError("video-to-video needs the VAE")
        pixels = frames_to_pixels(video, height, width).to(self.vae.device)
        s = self.spatial_scale
        post = noise.draw((1, self.vae.latent_channels, self.vae.latent_frames(video.shape[0]), height // s, width // s))
        return self.vae.encode(pixels, sample=True, noise=post).to(self.device)

    # -- sampling ----------------------------------------------------------------------------
    def _net(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return network_call(self.transformer, x, t, **cond)

    def denoiser(self):
        """The model as a denoiser ``d(x, sigma, **cond) -> x0`` (the family's prediction type)."""
        return self.family.denoiser(self._net, self.schedule)

    def sigmas(self, steps: int, denoise: float = 1.0, spacing: str | None = None, sampler: str | None = None,
               latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The run's sigmas; ``denoise < 1`` keeps the last ``int(steps * denoise)`` steps.
        ``spacing``: a timestep or sigma spacing (default: the one the family's release uses
        with ``sampler``, else the scheduler config's). ``latent_shape``: the latents' (for
        families whose schedule shifts with resolution and length)."""
        spacing = spacing or self.family.spacing(sampler or self.sampler)
        if latent_shape is not None:
            sigmas = self.family.sigmas(self.schedule, steps, spacing, tuple(latent_shape), self.spatial_scale)
        else:
            sigmas = self.schedule.get_sigmas(steps, spacing=spacing)
        if denoise < 1.0:
            kept = min(int(steps * denoise), steps)
            sigmas = sigmas[steps - kept :]
        return sigmas

    def prepare(
        self,
        *,
        prompt: str | None = None,
        negative_prompt: str = "",
        cond: dict[str, torch.Tensor] | None = None,
        uncond: dict[str, torch.Tensor] | None = None,
        conditioning: dict[str, torch.Tensor] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        noise_source: SeededNoise | Callable | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        spacing: str | None = None,
        denoise: float = 1.0,
        dynamic_cfg: bool = False,
        image=None,
        video: torch.Tensor | None = None,
        frame_latents: torch.Tensor | None = None,
        fps: float | None = None,
        check_memory: bool = False,
        options: dict | None = None,
    ) -> Request:
        """A generation request checked and made ready to sample: the one place where what a
        caller asked becomes mode, shapes, sigmas, noise and conditioning. Everything is refused
        before any encoding or sampling starts.

        The text comes as a ``prompt`` (+ ``negative_prompt``, encoded here with the family's
        prompt ``options``) or as encoded ``cond`` / ``uncond`` dicts (``uncond`` None: no
        guidance). ``conditioning``: extra transformer inputs for both branches. The size comes
        from ``num_frames`` / ``height`` / ``width`` (None: the model's, or the input video's),
        or from ``latents`` [B, C, T, h, w] (their shape; with ``denoise < 1`` also where to
        start). Frames to condition on come as pixels (``image``: a first frame; ``video`` with
        denoise 1: a clip to continue) or as ``frame_latents``; ``video`` with ``denoise < 1`` is
        video-to-video (an ``image`` with ``denoise < 1`` on an image model, image-to-image).
        ``noise`` replaces the first draw of the seeded noise; ``noise_source`` (else one from
        ``seed``) feeds stochastic samplers. ``check_memory``: refuse what cannot fit in the
        device's free memory.
        """
        steps = self.steps if steps is None else steps
        cfg = self.cfg if cfg is None else cfg
        sampler = sampler or self.sampler
        check_request(num_frames, height, width, steps, cfg, denoise)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps={fps!r}: must be a positive number (e.g. 24)")
        if (prompt is None) == (cond is None):
            raise ValueError("pass either a prompt or its encoded conditioning (cond)")
        options = options or {}
        self.family.check_options(options)
        if noise is not None:
            check_finite("noise", noise)
        if latents is not None:
            check_finite("the input latents", latents)

        image, video, extend = self._frame_inputs(image, video, frame_latents, denoise)
        if latents is not None:
            shape, keep = tuple(latents.shape), latents.shape[2]
        else:
            num_frames, height, width = self._size(num_frames, height, width, video, extend)
            keep, t_pad = self.latent_frames(num_frames)
            if video is not None and not extend and t_pad != keep:
                raise ValueError(f"video-to-video with {self.name} needs its {keep} latent frames to fill the transformer's "
                                 f"temporal patches ({t_pad}); pick a frame count that gives {t_pad} latent frames")
            shape = self.latent_shape(num_frames, height, width)
            if check_memory:
                self.check_memory(num_frames, height, width, guidance=cfg > 1.0)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        if denoise < 1.0 and video is None and latents is None:
            raise ValueError("denoise < 1 needs an input `video` (video-to-video)")
        sigmas = self.sigmas(steps, denoise, spacing, sampler, latent_shape=shape)
        if noise_source is None and (seed is not None or noise is None or image is not None or video is not None):
            noise_source = self.noise_source(seed or 0, shape)  # (given noise alone: stochastic samplers draw their own)

        if prompt is not None:  # encoded after every check: nothing is refused after this work
            cond = self.encode_prompt(prompt, **options)
            uncond = self.family.negative_conditioning(self.text_encoder, negative_prompt, cond) if cfg > 1.0 else None
        cond = {**cond, **(conditioning or {})}
        uncond = {**uncond, **(conditioning or {})} if uncond is not None and cfg > 1.0 else None

        # the noise stream is drawn in the reference's order: the frames' posteriors, then the noise
        if image is not None:
            frame_latents = self.encode_first_frame(image, height, width, noise_source)
        elif extend:
            frame_latents = self.encode_video(video, height, width, noise_source)
        init = latents.to(self.device) if latents is not None and denoise < 1.0 else None
        if video is not None and not extend:
            init = self.encode_video(video, height, width, noise_source)
        if noise is None:
            noise = noise_source()

        # precedence: the family's size inputs, then what the caller passed, then the frames'
        size = self.family.sample_conditioning(self.config, shape, self.spatial_scale, fps)
        frames = frames_conditioning(self.family, self.config, frame_latents, shape[2]) if frame_latents is not None else {}
        on_device = lambda d: {k: v.to(self.device) for k, v in d.items()}  # noqa: E731
        cond = batch_conditioning(on_device({**size, **cond, **frames}), shape[0])
        if uncond is not None:
            uncond = batch_conditioning(on_device({**size, **uncond, **frames}), shape[0])
        cond, uncond = self.family.pair_conditioning(cond, uncond)
        guidance = self.family.guidance_scale(cfg, steps, self.schedule, dynamic_cfg) if cfg > 1.0 and uncond is not None else None
        if init is not None:
            mode = "video-to-video"
        elif frame_latents is not None:
            mode = "video extension" if continues_clip(self.family, frame_latents) else "image-to-video"
        else:
            mode = "text-to-video"
        return Request(mode=mode, shape=shape, keep=keep, sampler=sampler, sigmas=sigmas, guidance=guidance, cond=cond, uncond=uncond,
                       noise=noise.to(self.device), noise_source=noise_source, init_latents=init)

    def _frame_inputs(self, image, video, frame_latents, denoise: float):
        """(image, video, extend) after checking what frames were given (pixels or latents)
        against the model: an image with denoise < 1 on an image model becomes a one-frame video
        (image-to-image)."""
        if image is not None and not self.is_i2v and denoise < 1.0 and video is None:
            image, video = None, image_tensor(image)
        extend = video is not None and denoise >= 1.0
        if video is not None:
            check_finite("the input video", video)
        if image is not None:
            image = check_finite("the input image", image_tensor(image))
        if extend and not self.family.extends_videos:
            raise ValueError(f"{self.name} takes a video only for video-to-video: pass denoise < 1 (e.g. 0.7)")
        if self.is_i2v and image is None and frame_latents is None:
            raise ValueError(f"{self.name} is an image-to-video model: pass `image` (the first frame)")
        if (image is not None or frame_latents is not None) and not self.family.takes_image(self.config):
            raise ValueError(f"{self.name} is a text-to-video model; `image` needs an image-to-video model")
        if image is not None and extend:
            raise ValueError("pass `image` (a first frame) or `video` (a clip to continue), not both")
        return image, video, extend

    def _size(self, num_frames, height, width, video, extend: bool) -> tuple[int, int, int]:
        """(frames, height, width) of the request: as asked, else the input video's, else the
        model's; checked against the model's rules."""
        if video is not None:
            height = video.shape[1] if height is None else height
            width = video.shape[2] if width is None else width
            if not extend:
                num_frames = video.shape[0] if num_frames is None else num_frames
                if video.shape[0] != num_frames:
                    raise ValueError(f"video has {video.shape[0]} frames but num_frames={num_frames}")
        f0, h0, w0 = self.default_size
        size = (f0 if num_frames is None else num_frames, h0 if height is None else height, w0 if width is None else width)
        self.check_size(*size)
        return size

    def run(self, request: Request, callback: Callable[[dict], None] | None = None, progress: bool = True,
            step_cache: float = 0.0) -> torch.Tensor:
        """Sample a prepared request: latents [B, C, T, h, w] (T padded as the transformer needs;
        ``request.crop`` drops the padding). ``step_cache`` > 0: skip the transformer on steps whose
        input changed by less than that in total (:mod:`vdit_core.step_cache`; 0: off)."""
        check_request(step_cache=step_cache)
        r, model = request, self.denoiser()
        if r.init_latents is not None:
            if len(r.sigmas) < 2:
                return r.init_latents
            x = model.noise_form.add_noise(r.init_latents.float(), r.noise.float(), float(r.sigmas[0]))
        else:
            x = model.prior(r.noise.float(), float(r.sigmas[0]))  # as the reference pipelines start
        extra = r.cond
        if r.guidance is not None:
            model = CFGDenoiser(model, r.guidance) if self.parallel is None else self.parallel.guidance(model, r.guidance)
            extra = {"cond": r.cond, "uncond": r.uncond}
        kwargs = {"noise_sampler": r.noise_source} if r.sampler in STOCHASTIC_SAMPLERS and r.noise_source is not None else {}
        self.transformer.step_cache = StepCache(step_cache) if step_cache > 0 else None
        try:
            return SAMPLERS[r.sampler](model, x, r.sigmas, extra_args=extra, callback=callback, disable=not progress, **kwargs)
        finally:  # what it skipped stays readable (last_step_cache); the model forgets it
            self.last_step_cache, self.transformer.step_cache = self.transformer.step_cache, None

    def sample(self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None, noise: torch.Tensor, *,
               init_latents: torch.Tensor | None = None, callback: Callable[[dict], None] | None = None, progress: bool = True,
               step_cache: float = 0.0, **request) -> torch.Tensor:
        """Latents [B, C, T, h, w] from standard-normal ``noise`` of that shape, for encoded
        ``cond`` / ``uncond`` batched like it: :meth:`prepare` (``request``: its ``steps``,
        ``cfg``, ``sampler``, ``spacing``, ``denoise``, ``noise_source``, ``dynamic_cfg``,
        ``fps``, ``frame_latents``), then :meth:`run`. ``init_latents`` + ``denoise < 1``: start
        from those latents noised to the level of the first kept step."""
        if request.get("denoise", 1.0) < 1.0 and init_latents is None:
            raise ValueError("denoise < 1 needs latents to start from (an input video)")
        prepared = self.prepare(cond=cond, uncond=uncond, noise=noise, latents=init_latents if init_latents is not None else noise, **request)
        return self.run(prepared, callback, progress, step_cache)

    def decode(self, latents: torch.Tensor, progress: bool = False, **vae_kwargs) -> torch.Tensor:
        """Latents [1, C, T, h, w] -> frames [F, H, W, 3] in [0, 1] (float32, CPU). Without a
        ``tiling`` argument the tile size comes from the memory free now (untiled when it fits).
        ``progress``: a tqdm bar over the decoded chunks."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE loaded")
        if "tiling" not in vae_kwargs:
            f, (h, w) = self.vae.pixel_frames(latents.shape[2]), latents.shape[-2:]
            s = self.spatial_scale
            vae_kwargs["tiling"] = self.vae.auto_tiling(f, h * s, w * s)
        bar = tqdm(desc="decoding", unit="latent frame", leave=False, dynamic_ncols=True) if progress else None
        if bar is not None:
            def report(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            vae_kwargs["progress"] = report
        try:
            video = self.vae.decode(latents.to(self.vae.device), **vae_kwargs)  # [1, 3, F, H, W]
        finally:
            if bar is not None:
                bar.close()
        return pixels_to_frames(video[0].cpu())

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        image=None,
        video: torch.Tensor | None = None,
        denoise: float = 1.0,
        callback: Callable[[dict], None] | None = None,
        dynamic_cfg: bool = False,
        progress: bool = True,
        vae_tiling=None,
        check_memory: bool = True,
        conditioning: dict[str, torch.Tensor] | None = None,
        fps: float | None = None,
        step_cache: float = 0.0,
        decode: bool = True,
        **options,
    ) -> torch.Tensor:
        """Generate a video; returns frames [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout), or
        with ``decode=False`` the latents [1, C, T, h, w] that :meth:`decode` turns into them.

        ``num_frames``, ``height``, ``width``, ``steps``, ``cfg``: None takes the model's default.
        ``image``: the first frame for image-to-video models (IMAGE tensor or PIL image).
        ``video`` [F, H, W, 3] + ``denoise < 1``: video-to-video (for image models, ``image`` +
        ``denoise < 1`` is image-to-image); ``video`` with ``denoise`` 1, for families that extend
        videos (Open-Sora): the new clip continues the video's last frames. ``noise`` [1, C, T, h, w]
        replaces the seeded initial noise (T padded as the family's transformer needs).
        ``conditioning``: extra inputs of the transformer for both CFG branches (HunyuanDiT v1.1:
        ``image_meta_size``, ``style``). A request that cannot fit in the device's free memory is
        refused before anything is allocated (``check_memory=False`` tries anyway). ``fps``: the
        frame rate families that condition on it are told (Open-Sora). ``step_cache``: see
        :meth:`run`. ``options``: the family's prompt options (Open-Sora: ``aesthetic_score=6.5``,
        None to leave it out; ``motion_score``). See :meth:`prepare` for how the request is read.
        """
        check_request(step_cache=step_cache)
        request = self.prepare(
            prompt=prompt, negative_prompt=negative_prompt, conditioning=conditioning, num_frames=num_frames, height=height,
            width=width, noise=noise, seed=seed, steps=steps, cfg=cfg, sampler=sampler, denoise=denoise, dynamic_cfg=dynamic_cfg,
            image=image, video=video, fps=fps, check_memory=check_memory, options=options,
        )
        latents = request.crop(self.run(request, callback, progress, step_cache))  # the family's front padding dropped, as the reference
        if not decode:
            return latents
        return self.decode(latents, **({"tiling": vae_tiling} if vae_tiling is not None else {}))


CogVideoXPipeline = Pipeline  # the name before the family layer (CogVideoX was the only family)


# ----------------------------------------------------------------------------------------------
# loading


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; a one-line error (naming what is usable) otherwise."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {str(device)!r}: not a device name ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r}: {why} (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1})")
    return dev


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed PyTorch."""
    import re

    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def check_compiler(device: str | torch.device) -> None:
    """Refuse ``torch.compile`` where it cannot generate code: on a CPU it needs a C++ compiler on
    PATH, on CUDA the triton package; and before PyTorch 2.5, where dynamo compiles each block on
    its own (guarding on the module object) and stops compiling after 8 of a model's 30-56."""
    import importlib.util
    import os
    import shutil

    if torch_version() < (2, 5):
        raise ValueError(f"compile: needs PyTorch 2.5 or later (this is {torch.__version__}), where the transformer's "
                         "blocks share one compiled graph; upgrade torch or run without compile")
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("compile: torch.compile on CUDA needs the triton package (pip install triton); run without compile")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        raise ValueError("compile: torch.compile on a CPU needs a C++ compiler on PATH (g++ or clang++); run without compile")


def compile_blocks(transformer: nn.Module, family: families.Family | None = None, backend="inductor") -> None:
    """Compile each transformer block with ``torch.compile`` (regional compilation: the blocks
    share their compiled code, so compiling does not take longer for deeper models). The first
    call compiles; outputs equal eager ones within float rounding. Every linear layer of the
    blocks gets its LoRA hook first: compiled code would never see one added later, and with it
    LoRAs attach, detach and change strength without recompiling (:mod:`vdit_core.lora`)."""
    from .lora import add_hooks

    family = family or families.for_transformer(transformer)
    for block in family.blocks(transformer):
        add_hooks(block)
        block.compile(backend=backend)


def check_transformer_options(device: str | torch.device, dtype: torch.dtype | None = None, attention: str | None = None,
                              compile: bool = False, fp8: bool = False, gpu_blocks: int | None = None) -> None:
    """Refuse transformer options that cannot work on ``device`` before anything loads: an
    attention backend that cannot run (checked when the dtype is known), compile without a code
    generator, float8 where it is not supported, compile with block swap."""
    if compile and gpu_blocks is not None:
        raise ValueError("compile and gpu_blocks (block swap) cannot be combined yet: turn compile off, or leave gpu_blocks unset")
    if attention and dtype is not None:
        resolve_backend(attention, device, dtype)
    if compile:
        check_compiler(device)
    if fp8:
        check_fp8(device)


def setup_transformer(family: families.Family, path: Path, device: str | torch.device, dtype: torch.dtype | None,
                      attention: str | None = None, compile: bool = False, fp8: bool = False, gpu_blocks: int | None = None) -> nn.Module:
    """A family's transformer as every loader sets it up (:func:`check_transformer_options` first):
    weights loaded in ``dtype`` (None: the file's), the blocks' linear layers in float8 with
    ``fp8``, on ``device``, or with ``gpu_blocks`` blocks there and the rest streamed from CPU
    memory (:mod:`vdit_core.offload`), ``attention`` as its backend, blocks compiled with ``compile``."""
    staged = fp8 or gpu_blocks is not None  # loaded in CPU memory first, so the device never holds what it should not
    transformer = family.load_transformer(path, dtype=dtype, device="cpu" if staged else device)
    if fp8:
        quantize(transformer, family.blocks(transformer))
    if gpu_blocks is not None:
        transformer.block_swap = BlockSwap(transformer, family.blocks(transformer), device, gpu_blocks)
    elif staged:
        transformer.to(device)
    transformer.set_attention_backend(attention)
    if compile:
        compile_blocks(transformer, family)
    return transformer


def load_pipeline(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    vae_dtype: str | torch.dtype | None = None,
    text_encoder_dtype: str | torch.dtype | None = None,
    attention: str | None = None,
    transformer: str | Path | None = None,
    compile: bool = False,
    fp8: bool = False,
    gpu_blocks: int | None = None,
) -> Pipeline:
    """Load a model folder of any family (a diffusers-format folder: ``model_index.json``,
    ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).

    The family is detected from the folder; the sampler defaults come from its scheduler config.
    ``transformer``: a transformer file or folder to use instead of the folder's own (an official
    checkpoint, a finetune), checked to be of the folder's family. ``compile``: compile each
    transformer block with ``torch.compile`` (:func:`compile_blocks`). ``fp8``: store the linear
    layers of the transformer's blocks in float8 (:mod:`vdit_core.fp8`; about half the weight
    memory of bf16, computed in ``dtype``); a weight file that is already float8 stays so without it.
    ``gpu_blocks``: keep that many transformer blocks on the GPU and stream the others from CPU
    memory as they run (:mod:`vdit_core.offload`; None: the whole transformer on the device).
    (The bundled demo model's folder is ``vdit_core.demo.demo_model_path()``.)
    """
    path = Path(path)
    device = check_device(device or _default_device())
    dtype = parse_dtype(dtype)
    check_transformer_options(device, dtype, attention, compile, fp8, gpu_blocks)
    check_block_swap(device, gpu_blocks)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: load_pipeline needs a model folder (model_index.json, transformer/, vae/, ...); "
            "for a single transformer or VAE file use vdit_core.load_transformer / load_vae"
        )
    family = families.for_folder(path)
    if transformer is not None and not Path(transformer).is_dir() and families.for_file(transformer, "transformer") is not family:
        raise CheckpointError(f"{transformer}: a {families.for_file(transformer, 'transformer').label} transformer cannot run in "
                              f"{path}, a {family.label} model folder")
    transformer = setup_transformer(family, Path(transformer) if transformer is not None else path / "transformer", device, dtype,
                                    attention, compile, fp8, gpu_blocks)
    vae = family.load_vae(path / "vae", dtype=parse_dtype(vae_dtype, dtype), device=device)
    text_encoder = family.load_text_encoder(path, dtype=parse_dtype(text_encoder_dtype, dtype), device=device)
    name = families.folder_defaults(path)[2].get("name", path.name)
    return Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, name=name, family=family,
                    **family.model_defaults(path, transformer.config))
