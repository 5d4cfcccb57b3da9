"""The ``Family`` base class: the facts and loaders of one model family, and the helpers its size
rules are written with."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..checkpoint import read_json
from ..detect import Signature
from .folder import folder_defaults


def neighbours(value: int, multiple: int, offset: int = 0) -> tuple[int, int]:
    """The two valid values around ``value`` among ``offset + k * multiple`` (the smallest valid
    value is ``offset``, or ``multiple`` when there is no offset)."""
    lo = max(((value - offset) // multiple) * multiple + offset, offset if offset else multiple)
    return lo, lo + multiple


def multiple_problem(label: str, value: int, multiple: int) -> str | None:
    """Why ``value`` is not a positive multiple of ``multiple`` (with the nearest valid values), or None."""
    if value >= multiple and value % multiple == 0:
        return None
    lo, hi = neighbours(value, multiple)
    return f"{label}={value}: must be a positive multiple of {multiple}; nearest valid: {lo} or {hi}"



class Family:
    """The facts and loaders of one model family; a family module subclasses this once.

    ``config`` arguments are the family's transformer config (``transformer.config``);
    ``spatial_scale`` is the pixels per latent cell of its VAE. Sizes are pixel sizes.
    """

    name: str = ""  # registry key
    label: str = ""  # how users read it: "CogVideoX"
    signatures: tuple[Signature, ...] = ()
    pipeline_classes: tuple[str, ...] = ()  # model_index.json ``_class_name`` values of its folders
    vae_variants: tuple[str, ...] = ()  # presets a single VAE file may be read as (the VAE loader's "variant")
    lora_targets: str = ""  # regex over module names: the Linears a LoRA adapts by default
    resolutions: tuple[tuple[int, int], ...] = ()  # (width, height) the releases were trained at (offered by the nodes)
    named_resolutions: dict[str, tuple[int, int]] = {}  # the release's names for sizes ("240p 16:9": (424, 240))
    durations: dict[str, int] = {}  # the release's names for frame counts ("2s": 51)
    caption_groups: tuple[tuple[str, ...], ...] = ()  # conditioning keys that caption dropout replaces together (default: all)
    text_encoder_kind: str = ""  # families with the same kind take each other's text encoder files (T5-v1.1-XXL)
    extends_videos: bool = False  # whether a video with denoise 1 conditions a continuation (video_conditioning)
    extension_frames: int = 0  # with extends_videos: the video's last frames that start the continuation
    prompt_note: str = ""  # how its prompts are read, for users (the text node's tooltip quotes it)
    prompt_options: tuple[str, ...] = ()  # keyword options of encode_text (pipeline call options)
    prompt_defaults: dict[str, object] = {}  # the release's values of those options (None: left out)
    noise_permute: tuple[int, ...] | None = None  # the reference's per-sample noise layout (seed parity)
    # latent -> RGB in [-1, 1] for previews: (a [C][3] matrix, a bias of 3) over model-space latents, or None
    latent_rgb: tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]] | None = None
    text_state: str = ""  # the conditioning key of the main text states (ComfyUI's conditioning tensor)
    held_frames_input: str = ""  # the transformer input marking frames generated (True) vs held clean (False), for frame_latents

    # -- the releases' facts as users read them (node tooltips, --help and the bundled workflows quote
    # them through release_facts and quote below; the checks use the same methods)
    presets: dict[str, object] = {}  # the releases' transformer configs by name (its model module's PRESETS)
    text_length: int = 0  # T5 tokens per prompt of the releases (0: none; the family's encoders fix their own)

    def frame_rule(self, config=None) -> str:
        """The frame counts it takes, in words ("4k+1"); without ``config``: the releases' rule."""
        return ""

    def size_multiple(self, config=None, spatial_scale: int = 8) -> int:
        """What pixel heights and widths must be a multiple of; without ``config``: the releases'."""
        return 0

    # -- detection -------------------------------------------------------------------------------
    # what each part of a complete model folder holds besides its weights (a trailing "/": a folder
    # that must not be empty); the weights alone (what a download dialog lists) do not load
    folder_parts: dict[str, tuple[str, ...]] = {}

    def folder_missing(self, folder: Path, part: str | None = None) -> list[str]:
        """What a model folder lacks of :attr:`folder_parts` (``part``: "transformer", "vae",
        "text_encoder"; None: all of them); empty when complete."""
        needed = [p for k, ps in self.folder_parts.items() if part is None or k == part for p in ps]
        return [p for p in dict.fromkeys(needed)
                if not ((folder / p).is_dir() and any((folder / p).iterdir()) if p.endswith("/") else (folder / p).is_file())]

    def recognises_folder(self, folder: Path) -> bool:
        """Whether ``folder`` is a model folder of this family."""
        index = folder / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name", "") in self.pipeline_classes

    def owns(self, transformer: nn.Module) -> bool:
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------------
    def load_transformer(self, path: Path, dtype: torch.dtype | None, device) -> nn.Module:
        raise NotImplementedError

    def load_vae(self, path: Path, dtype: torch.dtype | None, device, variant: str | None = None) -> nn.Module:
        raise NotImplementedError

    def load_text_encoder(self, path: Path, dtype: torch.dtype | None, device, tokenizer: Path | None = None, max_length: int = 0):
        """A text encoder from a model folder (``tokenizer`` None) or a weight file + a tokenizer
        folder (the tokenizer itself, or a folder of tokenizers such as ComfyUI's text_encoders
        package, where the family finds its own)."""
        raise NotImplementedError

    def save_transformer(self, transformer: nn.Module, folder: Path, dtype: torch.dtype | None, state_dict: dict | None = None) -> None:
        raise NotImplementedError

    def preset_name(self, config) -> str | None:
        """The release a transformer config matches, if any."""
        return None

    # -- sampling --------------------------------------------------------------------------------
    def sampling_defaults(self, folder: Path | None, config) -> dict:
        """``schedule``, ``sampler``, ``steps``, ``cfg`` and ``vae_scale`` (pixels per latent cell)
        of a model: from its folder's configs where there are some, else the release's."""
        raise NotImplementedError

    def model_defaults(self, folder: Path | None, config) -> dict:
        """:meth:`sampling_defaults` plus what a model folder may add for previews
        (``_vdit_defaults.latent_rgb``: latent -> RGB factors fitted to its own VAE)."""
        return {**self.sampling_defaults(folder, config), "latent_rgb": folder_defaults(folder)[2].get("latent_rgb")}

    def spacing(self, sampler: str) -> str | None:
        """The timestep spacing the release's own inference uses with ``sampler`` (None: the
        schedule's default)."""
        return None

    def denoiser(self, net: Callable, schedule):
        """The network as a denoiser ``d(x, sigma, **cond) -> x0`` (it owns the training loss)."""
        raise NotImplementedError

    def guidance_scale(self, cfg: float, steps: int, schedule, dynamic: bool):
        """The guidance scale, or a function of sigma for dynamic guidance."""
        if dynamic:
            raise ValueError(f"{self.label} has no dynamic guidance")
        return cfg

    def encode_text(self, text_encoder, prompt: str | list[str], **options) -> dict[str, torch.Tensor]:
        """The conditioning dict the transformer takes (hidden states, masks); ``options``: the
        family's :attr:`prompt_options`."""
        raise NotImplementedError

    def check_options(self, options: dict) -> None:
        """Refuse keyword options that are not among :attr:`prompt_options`, naming those that are."""
        unknown = sorted(set(options) - set(self.prompt_options))
        if unknown:
            known = ", ".join(self.prompt_options) or "none"
            raise ValueError(f"{', '.join(unknown)}: not an option of {self.label} models (their prompt options: {known})")

    def negative_conditioning(self, text_encoder, negative_prompt: str, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional branch for CFG, given the prompt's conditioning."""
        return self.encode_text(text_encoder, negative_prompt)

    def pair_conditioning(self, cond: dict, uncond: dict | None) -> tuple[dict, dict | None]:
        """Both CFG branches just before sampling (an unconditional branch may borrow from the
        conditional one, e.g. its text mask)."""
        return cond, uncond

    def sample_conditioning(self, config, latent_shape: tuple[int, ...], spatial_scale: int, fps: float | None = None) -> dict[str, torch.Tensor]:
        """Inputs the transformer takes besides text and image, from the latent shape (e.g. fps
        and pixel size), batched like the latents."""
        return {}

    def sigmas(self, schedule, steps: int, spacing: str | None, latent_shape: tuple[int, ...], spatial_scale: int) -> torch.Tensor:
        """A run's sigmas (``steps`` + 1, ending at 0); families whose schedule depends on the
        size (a resolution/length shift) compute it from ``latent_shape``."""
        return schedule.get_sigmas(steps, spacing=spacing)

    def train_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...], spatial_scale: int) -> torch.Tensor:
        """Training sigmas of a batch of this latent shape (a size-dependent shift)."""
        return sigmas

    def sigma_shift(self, latent_shape: tuple[int, ...], spatial_scale: int) -> float:
        """The time shift (``shift*s / (1 + (shift-1)*s)``) a flow model's sigmas get for latents of
        this shape (1: none; discrete schedules have none)."""
        return 1.0

    def latent_scaling(self, folder: Path | None, config) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(shift, scale) per latent channel from the VAE's raw latents to the model's:
        ``model = (raw - shift) * scale``. From the model folder's VAE config when given, else
        the release's VAE."""
        raise NotImplementedError

    def default_timestep_sampling(self) -> str:
        """The trainer's timestep sampling when the config says ``auto`` on one process."""
        return "uniform"

    # -- geometry --------------------------------------------------------------------------------
    def fps(self, config) -> float:
        raise NotImplementedError

    def latent_channels(self, config) -> int:
        raise NotImplementedError

    def default_size(self, config, spatial_scale: int) -> tuple[int, int, int]:
        """(frames, height, width) the model was trained at."""
        raise NotImplementedError

    def latent_frames(self, config, num_frames: int) -> tuple[int, int]:
        """(latent frames, latent frames padded for the transformer) of a pixel frame count."""
        raise NotImplementedError

    def size_problem(self, num_frames: int, height: int, width: int, config=None, spatial_scale: int = 8, frames_label: str = "num_frames") -> str | None:
        """Why a size cannot be generated (one line naming the nearest valid values), or None.
        Without ``config`` only the family's general rule is checked."""
        raise NotImplementedError

    def size_warning(self, num_frames: int, height: int, width: int, config, spatial_scale: int) -> str | None:
        """A size that runs but was not trained (a warning), or None."""
        return None

    def tokens(self, config, latent_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(sequence length, hidden width) of one transformer pass over latents of this shape
        (for memory estimates; None: unknown)."""
        return None

    def activation_bytes(self, config, latent_shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Rough bytes of the activations of one transformer pass over latents [B, C, T, h, w]
        (B counts every batched pass, CFG branches included): q, k, v, the attention output, the
        4x MLP and the residuals, with memory-efficient attention (None: unknown)."""
        seq = self.tokens(config, tuple(latent_shape))
        if seq is None:
            return None
        n, d = seq
        return latent_shape[0] * n * d * (torch.finfo(dtype).bits // 8) * 12

    def latent_problem(self, config, latents: torch.Tensor) -> str | None:
        """Why latents [B, C, T, h, w] cannot be sampled by this model, or None."""
        c = self.latent_channels(config)
        if latents.shape[1] != c:
            return f"the latent has {latents.shape[1]} channels; this model works on {c}"
        return None

    def pad_latents(self, config, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, h, w] made ready for training (padding frames the transformer needs)."""
        return latents

    # -- image conditioning ---------------------------------------------------------------------
    def is_image_to_video(self, config) -> bool:
        """Whether the model needs a first frame."""
        return False

    def takes_image(self, config) -> bool:
        """Whether the model can be conditioned on a first frame (needed or optional)."""
        return self.is_image_to_video(config)

    def vae_info(self, vae_config: dict) -> dict:
        """The ``info()`` of the VAE a folder's ``vae/config.json`` describes (without loading it)."""
        raise NotImplementedError

    def image_latent_scale(self, vae_info: dict) -> float:
        """The factor applied to raw (unscaled) posterior samples of a conditioning image;
        ``vae_info`` holds the VAE's ``scaling_factor`` (and family-specific flags)."""
        return float(vae_info["scaling_factor"])

    def image_conditioning(self, config, image_latents: torch.Tensor, latent_t: int) -> dict[str, torch.Tensor]:
        """Conditioning from the first frame's latents [B, C, 1, h, w] (scaled by
        :meth:`image_latent_scale`) for a video of ``latent_t`` latent frames."""
        raise ValueError(f"{self.label} models take no image conditioning")

    def video_conditioning(self, config, video_latents: torch.Tensor, latent_t: int) -> dict[str, torch.Tensor]:
        """Conditioning from a video's latents [B, C, T', h, w] to continue it (``video`` with
        denoise 1); families without it take videos only for video-to-video (denoise < 1)."""
        raise ValueError(f"{self.label} models take a video only for video-to-video (denoise < 1)")

    # -- training --------------------------------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> Iterable[nn.Module]:
        """The transformer blocks, in the order they run (FSDP's units; block swap streams them in
        this order)."""
        raise NotImplementedError
