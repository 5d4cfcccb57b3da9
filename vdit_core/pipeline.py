"""Text/image/video-to-video with CogVideoX: the API the CLI, the ComfyUI nodes and the trainer's
validation use.

    pipe = vdit_core.load_pipeline("path/to/CogVideoX-5b", device="cuda", dtype=torch.bfloat16)
    frames = pipe(prompt="a cat", num_frames=49, steps=50, cfg=6.0, seed=0)  # [F, H, W, 3] in [0, 1]

A seed reproduces the reference pipeline run with ``torch.Generator().manual_seed(seed)``: noise
is drawn in the same order and layout (latents as [B, T, C, H, W]).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, parse_dtype, read_json
from .guidance import CFGDenoiser, cogvideox_dynamic_cfg
from .models.cogvideox import CogVideoXConfig, CogVideoXTransformer, load_transformer
from .prediction import VPrediction
from .sampling import SAMPLERS, STOCHASTIC_SAMPLERS, SeededNoise, prior_sample
from .schedules import DiscreteSchedule, DiscreteScheduleConfig
from .text import T5TextEncoder, load_t5
from .vae.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig, load_vae

# the reference scheduler classes and the sampler each corresponds to
SCHEDULER_SAMPLERS = {
    "CogVideoXDDIMScheduler": "ddim",
    "DDIMScheduler": "ddim",
    "CogVideoXDPMScheduler": "cogvideox_dpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "UniPCMultistepScheduler": "unipc",
}
PIPELINE_CLASSES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
LATENT_PERMUTE = (1, 0, 2, 3)  # the reference draws latents as [T, C, H, W] per sample


def default_schedule(config: CogVideoXConfig) -> DiscreteScheduleConfig:
    """CogVideoX's released schedule: v-prediction, zero terminal SNR, trailing; SNR shift 3 for
    the 2B model, 1 for the 5B family."""
    shift = 3.0 if (config.inner_dim == 1920 and not config.use_rotary_positional_embeddings) else 1.0
    return DiscreteScheduleConfig(snr_shift_scale=shift, zero_terminal_snr=True, timestep_spacing="trailing")


def _neighbours(value: int, multiple: int, offset: int = 0) -> tuple[int, int]:
    lo = ((value - offset) // multiple) * multiple + offset
    return max(lo, offset if offset else multiple), lo + multiple


def _to_pixels(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [1, 3, F, height, width] in [-1, 1], resized when needed."""
    x = images.float().permute(0, 3, 1, 2)  # [F, 3, H, W]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).permute(1, 0, 2, 3)[None]


def _image_tensor(image) -> torch.Tensor:
    """A ComfyUI IMAGE ([1, H, W, 3] or [H, W, 3], 0..1) or a PIL image -> [1, H, W, 3]."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32) / 255.0
        image = torch.from_numpy(arr)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] != 3:
        raise ValueError(f"image must be [1, H, W, 3] or [H, W, 3] with values in 0..1, got {tuple(image.shape)}")
    return image


@dataclass
class CogVideoXPipeline:
    """A CogVideoX model with its VAE, text encoder and noise schedule.

    Each component is usable on its own: ``pipe.transformer``, ``pipe.vae`` (``encode``/
    ``decode``), ``pipe.text_encoder`` (``encode(prompt)``).
    """

    transformer: CogVideoXTransformer | None
    vae: CogVideoXVAE | None
    text_encoder: T5TextEncoder | None
    schedule: DiscreteSchedule
    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 6.0
    name: str = "cogvideox"
    vae_scale: int = 8  # pixels per latent cell when no VAE is loaded (8 for every release)

    # -- facts about the model ---------------------------------------------------------------
    @property
    def config(self) -> CogVideoXConfig:
        if self.transformer is None:
            raise ValueError("this pipeline has no transformer loaded")
        return self.transformer.config

    @property
    def fps(self) -> int:
        return 16 if self.config.is_v15 else 8

    @property
    def is_i2v(self) -> bool:
        return self.config.in_channels == 2 * self.config.out_channels

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent cell: the VAE's spatial compression (8 in every CogVideoX release)."""
        return self.vae.config.spatial_compression if self.vae is not None else self.vae_scale

    @property
    def default_size(self) -> tuple[int, int, int]:
        """(frames, height, width) the model was trained at."""
        c, s = self.config, self.spatial_scale
        return c.sample_frames, c.sample_height * s, c.sample_width * s

    def latent_frames(self, num_frames: int) -> tuple[int, int]:
        """(latent frames, padded to the temporal patch) for a pixel frame count."""
        t = (num_frames - 1) // 4 + 1
        pt = self.config.patch_size_t or 1
        return t, math.ceil(t / pt) * pt

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError for sizes the model cannot take (naming valid neighbours); warn for
        frame counts unlike the release's training."""
        if num_frames < 1 or (num_frames - 1) % 4:
            lo, hi = _neighbours(num_frames, 4, 1)
            raise ValueError(f"num_frames={num_frames}: CogVideoX takes 4k+1 frames; nearest valid: {lo} or {hi}")
        c, s = self.config, self.spatial_scale
        step = s * c.patch_size  # one transformer token
        for label, v in (("height", height), ("width", width)):
            if v < step or v % step:
                lo, hi = _neighbours(v, step)
                raise ValueError(f"{label}={v}: must be a positive multiple of {step}; nearest valid: {lo} or {hi}")
        if c.use_learned_positional_embeddings and (height, width) != (c.sample_height * s, c.sample_width * s):
            raise ValueError(
                f"this model ({self.name}) has learned positions for {c.sample_height * s}x{c.sample_width * s} "
                f"only; got {height}x{width}"
            )
        if c.use_learned_positional_embeddings and num_frames > c.sample_frames:
            raise ValueError(f"this model's learned positions cover at most {c.sample_frames} frames, got {num_frames}")
        trained = 16 if c.is_v15 else 8
        if (num_frames - 1) % trained:
            warnings.warn(
                f"num_frames={num_frames}: the CogVideoX{' 1.5' if c.is_v15 else ''} releases were trained on "
                f"{trained}N+1 frames (e.g. {trained * 3 + 1}); other 4k+1 counts run but may look worse",
                stacklevel=3,
            )

    # -- LoRA --------------------------------------------------------------------------------
    def load_lora(self, path, strength: float = 1.0):
        """Attach a LoRA file to the transformer (non-destructive; several stack)."""
        return self.transformer.load_lora(path, strength)

    def unload_loras(self) -> None:
        """Detach every LoRA: outputs are exactly the base model's again."""
        self.transformer.unload_loras()

    # -- conditioning ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder loaded")
        return self.text_encoder.encode(prompt)

    def noise_source(self, seed: int, latent_shape: tuple[int, ...]) -> SeededNoise:
        """The run's noise stream, drawing latents in the reference layout."""
        return SeededNoise(seed, latent_shape, device=self.device, permute=LATENT_PERMUTE)

    def encode_image(self, image, height: int, width: int, latent_t: int, noise: SeededNoise) -> torch.Tensor:
        """Image-to-video conditioning: the first frame's sampled latents, then zeros [1, C, T, h, w]."""
        if self.vae is None:
            raise ValueError("image-to-video needs the VAE")
        pixels = _to_pixels(_image_tensor(image), height, width).to(self.vae.device)
        c = self.vae.config.latent_channels
        s = self.spatial_scale
        post = noise.draw((1, c, 1, height // s, width // s))
        sf = self.vae.config.scaling_factor
        z = self.vae.encode(pixels, sample=True, noise=post, scale=(1 / sf) if self.vae.config.invert_scale_latents else sf)
        return torch.cat([z, z.new_zeros(1, c, latent_t - 1, *z.shape[-2:])], dim=2).to(self.device)

    def encode_video(self, video: torch.Tensor, height: int, width: int, noise: SeededNoise) -> torch.Tensor:
        """Video-to-video: sampled latents of frames [F, H, W, 3] in [0, 1]."""
        if self.vae is None:
            raise ValueError("video-to-video needs the VAE")
        pixels = _to_pixels(video, height, width).to(self.vae.device)
        t = (video.shape[0] - 1) // 4 + 1
        s = self.spatial_scale
        post = noise.draw((1, self.vae.config.latent_channels, t, height // s, width // s))
        return self.vae.encode(pixels, sample=True, noise=post).to(self.device)

    # -- sampling ----------------------------------------------------------------------------
    def _net(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(x, t, context, concat=concat).float()

    def denoiser(self) -> VPrediction:
        """The model as a denoiser ``d(x, sigma, context=..., concat=...) -> x0``."""
        return VPrediction(self._net, self.schedule)

    def sigmas(self, steps: int, denoise: float = 1.0, spacing: str | None = None) -> torch.Tensor:
        """The run's sigmas; ``denoise < 1`` keeps the last ``int(steps * denoise)`` steps.
        ``spacing``: a timestep or sigma spacing (default: the scheduler config's)."""
        sigmas = self.schedule.get_sigmas(steps, spacing)
        if denoise < 1.0:
            kept = min(int(steps * denoise), steps)
            sigmas = sigmas[steps - kept :]
        return sigmas

    def sample(
        self,
        context: torch.Tensor,
        negative_context: torch.Tensor | None,
        noise: torch.Tensor,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        noise_source: SeededNoise | Callable | None = None,
        denoise: float = 1.0,
        init_latents: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        dynamic_cfg: bool = False,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        spacing: str | None = None,
    ) -> torch.Tensor:
        """Latents [B, C, T, h, w] from standard-normal ``noise`` of that shape.

        ``init_latents`` + ``denoise < 1``: start from those latents noised to the level of the
        first kept step. ``noise_source(sigma, sigma_next)`` feeds stochastic samplers.
        """
        steps = steps or self.steps
        cfg = self.cfg if cfg is None else cfg
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
        if not 0.0 < denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {denoise}")
        sigmas = self.sigmas(steps, denoise, spacing)
        model = self.denoiser()
        if denoise < 1.0:
            if init_latents is None:
                raise ValueError("denoise < 1 needs latents to start from (an input video)")
            if len(sigmas) < 2:
                return init_latents
            x = model.noise_form.add_noise(init_latents.float(), noise.float(), float(sigmas[0]))
        else:
            x = prior_sample(noise.float(), sigmas[0])
        cond = {"context": context}
        if concat is not None:
            cond["concat"] = concat
        if cfg > 1.0 and negative_context is not None:
            scale = cogvideox_dynamic_cfg(cfg, steps, self.schedule.timestep) if dynamic_cfg else cfg
            model = CFGDenoiser(model, scale)
            extra = {"cond": cond, "uncond": {**cond, "context": negative_context}}
        else:
            extra = cond
        kwargs = {}
        if sampler in STOCHASTIC_SAMPLERS and noise_source is not None:
            kwargs["noise_sampler"] = noise_source
        return SAMPLERS[sampler](model, x, sigmas, extra_args=extra, callback=callback, disable=not progress, **kwargs)

    def decode(self, latents: torch.Tensor, **vae_kwargs) -> torch.Tensor:
        """Latents [1, C, T, h, w] -> frames [F, H, W, 3] in [0, 1] (float32, CPU)."""
        if self.vae is None:
            raise ValueError("this pipeline has no VAE loaded")
        video = self.vae.decode(latents.to(self.vae.device), **vae_kwargs)  # [1, 3, F, H, W]
        return (video[0].float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).contiguous()

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
    ) -> torch.Tensor:
        """Generate a video; returns frames [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout).

        ``image``: the first frame for image-to-video models (IMAGE tensor or PIL image).
        ``video`` [F, H, W, 3] + ``denoise < 1``: video-to-video. ``noise`` [1, C, T, h, w]
        replaces the seeded initial noise (T padded to the temporal patch for CogVideoX 1.5).
        """
        f0, h0, w0 = self.default_size
        if video is not None:
            num_frames = num_frames or video.shape[0]
            height, width = height or video.shape[1], width or video.shape[2]
            if video.shape[0] != num_frames:
                raise ValueError(f"video has {video.shape[0]} frames but num_frames={num_frames}")
        num_frames, height, width = num_frames or f0, height or h0, width or w0
        self.check_size(num_frames, height, width)
        if self.is_i2v and image is None:
            raise ValueError(f"{self.name} is an image-to-video model: pass `image` (the first frame)")
        if image is not None and not self.is_i2v:
            raise ValueError(f"{self.name} is a text-to-video model; `image` needs an image-to-video model")
        if denoise < 1.0 and video is None:
            raise ValueError("denoise < 1 needs an input `video` (video-to-video)")
        t, t_pad = self.latent_frames(num_frames)
        if video is not None and t_pad != t:
            raise ValueError(f"video-to-video with {self.name} needs {t} latent frames to be a multiple of {self.config.patch_size_t}")
        s = self.spatial_scale
        shape = (1, self.config.out_channels, t_pad, height // s, width // s)
        source = self.noise_source(seed, shape)

        context = self.encode_prompt(prompt)
        cfg_ = self.cfg if cfg is None else cfg
        negative = self.encode_prompt(negative_prompt) if cfg_ > 1.0 else None
        concat = self.encode_image(image, height, width, t_pad, source) if image is not None else None
        init = self.encode_video(video, height, width, source) if video is not None else None
        if noise is None:
            noise = source()
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for {num_frames}x{height}x{width}, got {tuple(noise.shape)}")
        latents = self.sample(
            context, negative, noise.to(self.device), steps, cfg_, sampler, source, denoise, init, concat,
            dynamic_cfg, callback, progress,
        )
        latents = latents[:, :, t_pad - t :]  # drop the padding frame(s) of CogVideoX 1.5, as the reference
        return self.decode(latents, **({"tiling": vae_tiling} if vae_tiling is not None else {}))


# ----------------------------------------------------------------------------------------------
# loading


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    vae_dtype: str | torch.dtype | None = None,
    text_encoder_dtype: str | torch.dtype | None = None,
    attention: str | None = None,
) -> CogVideoXPipeline:
    """Load a diffusers-format model folder (``model_index.json``, ``transformer/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``); ``None`` loads the bundled demo model.

    The sampler defaults come from the shipped scheduler config.
    """
    name = None
    if path is None:
        from .demo import demo_model_path

        path, name = demo_model_path(), "vdit-demo"
    path = Path(path)
    device = torch.device(device or _default_device())
    dtype = parse_dtype(dtype)
    vae_dtype = parse_dtype(vae_dtype, dtype)
    te_dtype = parse_dtype(text_encoder_dtype, dtype)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: load_pipeline needs a model folder (model_index.json, transformer/, vae/, ...); "
            "for a single transformer or VAE file use vdit_core.load_transformer / load_vae"
        )
    cls = read_json(path / "model_index.json").get("_class_name", "")
    if cls not in PIPELINE_CLASSES:
        raise CheckpointError(f"{path}: model_index.json describes a {cls or 'unknown'} pipeline; expected one of {PIPELINE_CLASSES}")
    transformer = load_transformer(path / "transformer", dtype=dtype, device=device)
    if attention:
        transformer.set_attention_backend(attention)
    vae = load_vae(path / "vae", dtype=vae_dtype, device=device)
    text_encoder = load_t5(
        path / "text_encoder", path / "tokenizer", dtype=te_dtype, device=device,
        max_length=transformer.config.max_text_seq_length,
    )
    return CogVideoXPipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, name=name or path.name,
                             **sampling_defaults(path, transformer.config))


def sampling_defaults(folder: Path | None, config: CogVideoXConfig) -> dict:
    """Schedule, sampler, steps and cfg of a model: from the folder's scheduler config (and the
    ``_vdit_defaults`` a model_index.json may carry), else the release's defaults; and the
    spatial compression of the folder's VAE (8 without one), so a pipeline without its VAE
    loaded still knows the pixel size of a latent."""
    sched_cfg_path = folder / "scheduler" / "scheduler_config.json" if folder else None
    if sched_cfg_path is not None and sched_cfg_path.exists():
        raw = read_json(sched_cfg_path)
        schedule_config = DiscreteScheduleConfig.from_diffusers(raw)
        sampler = SCHEDULER_SAMPLERS.get(raw.get("_class_name", ""), "ddim")
        if raw.get("prediction_type", "v_prediction") != "v_prediction":
            raise CheckpointError(f"{sched_cfg_path}: CogVideoX is v-prediction, the config says {raw.get('prediction_type')!r}")
    else:
        schedule_config, sampler = default_schedule(config), "ddim"
    index_path = folder / "model_index.json" if folder else None
    extra = read_json(index_path).get("_vdit_defaults", {}) if index_path is not None and index_path.exists() else {}
    return {
        "schedule": DiscreteSchedule.from_config(schedule_config),
        "sampler": extra.get("sampler", sampler),
        "steps": int(extra.get("steps", 50)),
        "cfg": float(extra.get("cfg", 6.0)),
        "vae_scale": _vae_scale(folder),
    }


def _vae_scale(folder: Path | None) -> int:
    path = folder / "vae" / "config.json" if folder else None
    if path is None or not path.exists():
        return 8
    return CogVideoXVAEConfig.from_diffusers(read_json(path)).spatial_compression
