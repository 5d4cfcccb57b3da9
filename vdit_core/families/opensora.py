"""Open-Sora 1.2 (hpcaitech, tag v1.2.0): text-, image- and video-conditioned video.

Facts:
* Frames: the VAE codes 17-frame chunks into 5 latent frames (a partial chunk of r frames into
  ceil(r/4)); the counts that round-trip are 17k + (4m - 3): 1 (an image), 5, 9, 13, 17, 18, ...,
  34, 51 (2 s), 102 (4 s), 204 (8 s), 408 (16 s). Sizes: multiples of the VAE's spatial
  compression, 8 (odd latent sizes are padded to whole patches, as the release does).
* Rectified flow, velocity ``x0 - noise`` in the first 4 of 8 output channels; sampled with flow
  Euler, 30 steps, CFG 7, the unconditional branch the learned null caption with the prompt's
  mask. Timesteps are shifted by resolution and length (:func:`sigmas`), in float32 as the release.
* Conditioning: T5-v1.1-XXL, 300 tokens with the mask; " aesthetic score: 6.5." appended to the
  prompt by default (``aesthetic_score``, ``motion_score`` options); fps 24 (an image: 120);
  the pixel size scales the positional table.
* Image and video conditioning: clean latent frames held in place (``x_mask``: t = 0 modulation),
  the first frame for image-to-video, the last 17 frames of a video to extend it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ..checkpoint import read_json
from ..detect import Signature
from ..memory import bf16_native
from ..models import opensora as model
from ..prediction import FlowPrediction
from ..schedules import FlowSchedule, time_shift
from ..text import load_t5_encoder
from ..vae import opensora_vae as vae
from .base import Family, multiple_problem
from .folder import folder_defaults
from .registry import register

TEXT_LENGTH = 300
DEFAULT_FPS = 24  # the fps a video is conditioned on when none is asked for (the release's sampling default)
IMAGE_FPS = 120  # the fps a single image is always conditioned on (the release's IMG_FPS)
AESTHETIC_SCORE = 6.5  # the release's sampling default (``aes``)
CONDITION_LATENT_FRAMES = 5  # a video extension is conditioned on its last 17 frames (5 latent frames), as the release's loop
# names offered by the nodes and the CLI: (label, (width, height)) of the release's aspect-ratio tables
# (datasets/aspect.py), rounded down to multiples of 8 (the size the release's VAE actually outputs)
NAMED_RESOLUTIONS = {
    "240p 16:9": (424, 240), "240p 9:16": (240, 424), "240p 1:1": (320, 320), "240p 4:3": (368, 272), "240p 3:4": (272, 368),
    "360p 16:9": (640, 360), "360p 9:16": (360, 640), "360p 1:1": (480, 480), "360p 4:3": (552, 416), "360p 3:4": (416, 552),
    "480p 16:9": (848, 480), "480p 9:16": (480, 848), "480p 1:1": (640, 640), "480p 4:3": (736, 552), "480p 3:4": (552, 736),
    "720p 16:9": (1280, 720), "720p 9:16": (720, 1280), "720p 1:1": (960, 960), "720p 4:3": (1104, 832), "720p 3:4": (832, 1104),
}
DURATIONS = {"image": 1, "2s": 51, "4s": 102, "8s": 204, "16s": 408}  # the release's NUM_FRAMES_MAP
LORA_TARGETS = model.STDiT3.lora_targets  # the transformer's own default


def shift_frames(num_frames: int) -> int:
    """The frame count in the resolution/length shift: ``num_frames // 17 * 5`` as released
    (images: 1); for 2-16 frames, where that is 0 (the release then gives NaN / zero timesteps),
    the latent frame count."""
    if num_frames == 1:
        return 1
    return num_frames // 17 * 5 if num_frames >= 17 else vae.latent_frames(num_frames)


def transform_sigmas(steps: int, num_frames: int, height: int, width: int, num_timesteps: int = 1000) -> torch.Tensor:
    """The release's sampler timesteps / 1000 plus a final 0, float64 holding float32 values.

    ``t_i = (1 - i/N) * 1000`` shifted by ``ratio = sqrt(H*W / 512^2) * sqrt(frames)``:
    ``ratio * t / (1 + (ratio - 1) * t)``, in float32 as ``timestep_transform`` does (frames:
    :func:`shift_frames`).
    """
    frames = shift_frames(num_frames)
    t = torch.tensor([(1.0 - i / steps) * num_timesteps for i in range(steps)], dtype=torch.float32) / num_timesteps
    hw = torch.tensor(float(height), dtype=torch.float32) * torch.tensor(float(width), dtype=torch.float32)
    ratio = (hw / (512 * 512)).sqrt() * torch.tensor(float(frames), dtype=torch.float32).sqrt()
    shifted = ratio * t / (1 + (ratio - 1) * t) * num_timesteps
    return torch.cat([shifted.double() / num_timesteps, torch.zeros(1, dtype=torch.float64)])


def append_scores(prompt: str, aesthetic_score: float | None = AESTHETIC_SCORE, motion_score: float | None = None) -> str:
    """The release's prompt suffixes (``append_score_to_prompts``), unless the prompt has them."""
    if aesthetic_score is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {aesthetic_score:.1f}."
    if motion_score is not None and "motion score:" not in prompt:
        prompt = f"{prompt} motion score: {motion_score:.1f}."
    return prompt


class OpenSora(Family):
    name = "opensora"
    label = "Open-Sora"
    signatures = (
        Signature("an Open-Sora 1.2 STDiT3 transformer", model.is_state_dict, "opensora", "transformer"),
        Signature("an Open-Sora 1.2 VAE (spatial + temporal)", lambda k: vae.is_state_dict(k) and vae.has_spatial(k), "opensora", "vae"),
        Signature("an Open-Sora 1.2 temporal VAE without its spatial stage", vae.is_state_dict, "opensora", "vae"),
    )
    pipeline_classes = ("OpenSoraPipeline",)
    text_encoder_kind = "t5-v1_1-xxl"
    lora_targets = LORA_TARGETS
    presets = model.PRESETS
    text_length = TEXT_LENGTH
    resolutions = tuple(NAMED_RESOLUTIONS.values())
    named_resolutions = NAMED_RESOLUTIONS
    durations = DURATIONS
    text_state = "y"
    held_frames_input = "x_mask"
    folder_parts = {"transformer": ("transformer/config.json",), "vae": ("vae/config.json",),
                    "text_encoder": ("text_encoder/config.json", "tokenizer/")}
    caption_groups = (("drop_text",),)  # caption dropout: the learned null caption, the caption's mask kept (as the release)
    prompt_options = ("aesthetic_score", "motion_score")
    prompt_defaults = {"aesthetic_score": AESTHETIC_SCORE, "motion_score": None}
    extends_videos = True
    extension_frames = vae.pixel_frames(CONDITION_LATENT_FRAMES)
    prompt_note = (f"' aesthetic score: {AESTHETIC_SCORE:g}.' is appended unless the text names a score itself; "
                   "an empty text is the model's learned null caption (the usual negative)")

    # -- detection -----------------------------------------------------------------------------
    def recognises_folder(self, folder):
        """The released layout has no model_index.json: a ``transformer/`` of STDiT3."""
        if super().recognises_folder(folder):
            return True
        cfg = folder / "transformer" / "config.json"
        if cfg.is_file():
            raw = read_json(cfg)
            return raw.get("model_type") == "STDiT3" or "STDiT3" in raw.get("architectures", [])
        return False

    def owns(self, transformer):
        return isinstance(transformer, model.STDiT3)

    # -- loading -------------------------------------------------------------------------------
    def load_transformer(self, path, dtype, device):
        return model.load_transformer(path, dtype=dtype, device=device)

    def load_vae(self, path, dtype, device, variant=None):
        """Never in float16: the spatial stage is the SDXL VAE, whose activations overflow float16
        (it decodes NaN); bfloat16 (float32 on GPUs without it) is used instead, with a warning."""
        if variant:
            raise ValueError(f"variant {variant!r}: Open-Sora's VAE has no variants")
        safe = torch.bfloat16 if bf16_native() else torch.float32
        why = (f"Open-Sora's VAE runs in {str(safe).removeprefix('torch.')}, not float16 (its SDXL spatial stage "
               "overflows float16 and decodes NaN)")
        if dtype == torch.float16:
            warnings.warn(f"{path}: {why}", stacklevel=2)
            dtype = safe
        model = vae.load_vae(path, dtype=dtype, device=device)
        if model.dtype == torch.float16:  # a float16 file read in its own dtype (dtype None)
            warnings.warn(f"{path}: float16 weights; {why}", stacklevel=2)
            for p in model.parameters():  # the normalisation buffers stay float32, as loaded
                p.data = p.data.to(safe)
        return model

    def load_text_encoder(self, path, dtype, device, tokenizer=None, max_length=0):
        return load_t5_encoder(path, dtype, device, tokenizer, max_length or TEXT_LENGTH)

    def save_transformer(self, transformer, folder, dtype, state_dict=None):
        model.save_transformer(transformer, folder, dtype=dtype, state_dict=state_dict)

    def preset_name(self, config):
        return model.preset_name(config)

    # -- sampling ------------------------------------------------------------------------------
    def sampling_defaults(self, folder, config):
        _, _, extra = folder_defaults(folder)
        return {
            "schedule": FlowSchedule(),
            "sampler": extra.get("sampler", "euler"),
            "steps": int(extra.get("steps", 30)),
            "cfg": float(extra.get("cfg", 7.0)),
            "vae_scale": 8,
        }

    def sigmas(self, schedule, steps, spacing, latent_shape, spatial_scale):
        if spacing not in (None, "linspace"):
            raise ValueError(f"spacing {spacing!r}: Open-Sora's timesteps are spaced evenly and shifted by resolution and length")
        _, _, t, h, w = latent_shape
        return transform_sigmas(steps, vae.pixel_frames(t), h * spatial_scale, w * spatial_scale, schedule.num_timesteps)

    def sigma_shift(self, latent_shape, spatial_scale):
        """``sqrt(H*W / 512^2) * sqrt(frames)``: the release's resolution/length ``timestep_transform``."""
        _, _, t, h, w = latent_shape
        return math.sqrt(h * spatial_scale * w * spatial_scale / 512**2) * math.sqrt(shift_frames(vae.pixel_frames(t)))

    def train_sigmas(self, sigmas, latent_shape, spatial_scale):
        """Training timesteps get the same resolution/length shift (``timestep_transform``)."""
        return time_shift(sigmas, self.sigma_shift(latent_shape, spatial_scale))

    def latent_scaling(self, folder, config):
        vae_config = Path(folder) / "vae" / "config.json" if folder else None
        shift, scale = vae.normalisation(read_json(vae_config) if vae_config is not None and vae_config.exists() else None)
        return shift, tuple(1 / s for s in scale)

    def default_timestep_sampling(self):
        return "logit_normal"

    def denoiser(self, net, schedule):
        return FrameConditioned(FlowPrediction(net, schedule, velocity="x0_minus_noise", learned_sigma_channels=True))

    def encode_text(self, text_encoder, prompt, aesthetic_score=AESTHETIC_SCORE, motion_score=None):
        """``y`` [B, 300, 4096], ``mask`` [B, 300], ``drop_text`` [B] (True for an empty prompt:
        the learned null caption, the release's unconditional branch)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        empty = torch.tensor([not p.strip() for p in prompts])
        texts = [p if not p.strip() else append_scores(p, aesthetic_score, motion_score) for p in prompts]
        y, mask = text_encoder.encode_with_mask(texts)
        return {"y": y, "mask": mask, "drop_text": empty.to(y.device)}

    def negative_conditioning(self, text_encoder, negative_prompt, cond):
        if not negative_prompt.strip():
            return self.pair_conditioning(cond, {**cond, "drop_text": torch.ones_like(cond["drop_text"])})[1]
        return self.encode_text(text_encoder, negative_prompt, aesthetic_score=None)  # no score on what is steered away from

    def pair_conditioning(self, cond, uncond):
        """The null caption reuses the prompt's mask (as the release's sampler)."""
        if uncond is not None and "drop_text" in uncond and bool(uncond["drop_text"].all()) and "mask" in cond:
            uncond = {**uncond, "y": cond["y"], "mask": cond["mask"]}
        return cond, uncond

    def sample_conditioning(self, config, latent_shape, spatial_scale, fps=None):
        b, _, t, h, w = latent_shape
        fps = IMAGE_FPS if t == 1 else (DEFAULT_FPS if fps is None else fps)  # an image: IMAGE_FPS whatever is asked, as released
        full = lambda v: torch.full((b,), float(v))  # noqa: E731
        return {"fps": full(fps), "height": full(h * spatial_scale), "width": full(w * spatial_scale)}

    # -- geometry ------------------------------------------------------------------------------
    def fps(self, config):
        return DEFAULT_FPS

    def latent_channels(self, config):
        return config.in_channels

    def default_size(self, config, spatial_scale):
        return 51, 240, 424  # the release's sample config: 240p 16:9, 2 s

    def frame_rule(self, config=None):
        return vae.frame_rule()

    def size_multiple(self, config=None, spatial_scale=8):
        return spatial_scale  # odd latent sizes are padded to whole patches

    def latent_frames(self, config, num_frames):
        t = vae.latent_frames(num_frames)
        return t, t

    def size_problem(self, num_frames, height, width, config=None, spatial_scale=8, frames_label="num_frames"):
        step = self.size_multiple(config, spatial_scale)
        return vae.frames_problem(num_frames, label=frames_label) or multiple_problem("height", height, step) or multiple_problem("width", width, step)

    def size_warning(self, num_frames, height, width, config, spatial_scale):
        if height * width > 1280 * 720 * 1.05:
            return f"{width}x{height}: Open-Sora 1.2 was trained up to 720p; larger sizes run but may look worse"
        return None

    def tokens(self, config, latent_shape):
        _, _, t, h, w = latent_shape
        pt, ph, pw = config.patch_size
        return -(-t // pt) * -(-h // ph) * -(-w // pw), config.hidden_size

    # -- image and video conditioning ------------------------------------------------------
    def takes_image(self, config):
        return True

    def vae_info(self, vae_config):
        return {"scaling_factor": 1.0}

    def image_conditioning(self, config, image_latents, latent_t):
        return self.frame_conditioning(config, image_latents[:, :, :1], latent_t)

    def video_conditioning(self, config, video_latents, latent_t):
        """Extension: the video's last 5 latent frames (17 frames) start the new clip (fewer when
        the video or the clip is shorter; the clip keeps at least one frame to generate)."""
        k = min(CONDITION_LATENT_FRAMES, video_latents.shape[2], latent_t - 1)
        if k < 1:
            raise ValueError("extending a video needs a clip of at least 2 latent frames (e.g. 18 or 34 frames)")
        return self.frame_conditioning(config, video_latents[:, :, -k:], latent_t)

    def frame_conditioning(self, config, latents, latent_t):
        b, c, k, h, w = latents.shape
        if c != self.latent_channels(config):
            raise ValueError(f"the conditioning latents have {c} channels; this model's have {self.latent_channels(config)}")
        frames = latents.new_zeros(b, c, latent_t, h, w)
        frames[:, :, :k] = latents
        mask = torch.zeros(b, latent_t, dtype=torch.bool, device=latents.device)
        mask[:, :k] = True
        return {"frame_latents": frames, "frame_mask": mask}

    # -- training ------------------------------------------------------------------------------
    def blocks(self, transformer):
        return [b for pair in zip(transformer.spatial_blocks, transformer.temporal_blocks) for b in pair]  # as they run


class FrameConditioned:
    """Holds conditioning frames at their clean latents: the network sees them clean and
    modulated with t = 0 (``x_mask`` False), and their denoised value is the latent itself, so
    any sampler leaves them where they are (Open-Sora's mask strategy with edit ratio 0)."""

    def __init__(self, inner: FlowPrediction):
        self.inner = inner
        self.noise_form = inner.noise_form
        self.prediction = inner.prediction
        self.schedule = inner.schedule

    def __call__(self, x: torch.Tensor, sigma, frame_latents=None, frame_mask=None, **cond) -> torch.Tensor:
        if frame_mask is None:
            return self.inner(x, sigma, **cond)
        keep = frame_mask.to(x.device).bool()[:, None, :, None, None]
        clean = frame_latents.to(x)
        x0 = self.inner(torch.where(keep, clean, x), sigma, **{OpenSora.held_frames_input: ~frame_mask.to(x.device).bool()}, **cond)
        return torch.where(keep, clean, x0)

    def prior(self, noise, sigma):
        return self.inner.prior(noise, sigma)

    def target(self, x0, noise, sigma):
        return self.inner.target(x0, noise, sigma)

    def natural_weight(self, snr):
        return self.inner.natural_weight(snr)

    def loss(self, x0, noise, sigma, weighting=None, min_snr_gamma: float = 5.0, frame_latents=None, frame_mask=None, **cond):
        return self.inner.loss(x0, noise, sigma, weighting, min_snr_gamma, **cond)


FAMILY = register(OpenSora())
