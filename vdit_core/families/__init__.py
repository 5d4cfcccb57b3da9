"""Model families: what the pipeline, the CLI, the nodes and the trainer know about a kind of model.

A family module (``cogvideox.py``) states a family's facts once: how its files are recognised,
its loaders, frame and size rules, fps, latent layout, prediction type and schedule defaults, how
image conditioning is assembled, its LoRA targets and the blocks FSDP wraps. Everything above
the models asks the family; nothing above it imports a family module.

``FAMILIES`` is a plain dict of the registered families, in detection order. :func:`detect` is
the one detection function: it finds the family of a model folder, and names what a weight file
looks like, both for dispatch and for "expected X, but this looks like Y" errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, load_state_dict, read_json, safetensors_keys, weight_files


@dataclass(frozen=True)
class Signature:
    """How one kind of weight file is recognised from its key names."""

    label: str  # what it looks like, in words: "a CogVideoX VAE (diffusers layout)"
    test: Callable[[set[str]], bool]
    family: str | None = None  # the registered family that loads it (None: a format we only name)
    part: str | None = None  # "transformer", "vae", "text_encoder", "lora", or "checkpoint" (all of a model in one file)
    layout: str = "diffusers"  # "diffusers" or an official layout converted at load ("sat", ...)


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


# the diffusers scheduler classes a model folder may name, and the sampler each corresponds to
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


def folder_defaults(folder: Path | None) -> tuple[dict | None, str, dict]:
    """What a model folder says about sampling: (its scheduler config or None, the sampler its
    scheduler class corresponds to ("ddim" when unknown), the ``_vdit_defaults`` of its
    model_index.json: steps, cfg, sampler, name)."""
    if folder is None:
        return None, "ddim", {}
    folder = Path(folder)
    raw, sampler = None, "ddim"
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.exists():
        raw = read_json(sched)
        sampler = SCHEDULER_SAMPLERS.get(raw.get("_class_name", ""), "ddim")
    index = folder / "model_index.json"
    extra = read_json(index).get("_vdit_defaults", {}) if index.exists() else {}
    return raw, sampler, extra


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
    prompt_options: tuple[str, ...] = ()  # keyword options of encode_text (pipeline call options)
    noise_permute: tuple[int, ...] | None = None  # the reference's per-sample noise layout (seed parity)
    # latent -> RGB in [-1, 1] for previews: (a [C][3] matrix, a bias of 3) over model-space latents, or None
    latent_rgb: tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]] | None = None

    # -- detection -------------------------------------------------------------------------------
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
    def lora_modules(self, name: str) -> list[str]:
        """For a LoRA module name of an official layout that is not one of ours: our module it
        adapts, or, for a fused projection, ours in the order of its output rows ([]: unknown)."""
        return []

    def blocks(self, transformer: nn.Module) -> Iterable[nn.Module]:
        """The transformer blocks, in the order they run (FSDP's units; block swap streams them in
        this order)."""
        raise NotImplementedError


def bf16_native() -> bool:
    """Whether bfloat16 runs natively where models run: on a CPU, or a CUDA GPU from Ampere on
    (older ones only emulate it, slowly)."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The half precision to encode in on ``device`` (text encoders, VAEs): bfloat16 where it runs
    natively, else float16 (each loader makes float16 safe for its model); float32 on a CPU,
    where half precision is slower."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.bfloat16 if bf16_native() else torch.float16


def load_t5_encoder(path: Path, dtype, device, tokenizer: Path | None, length: int):
    """A T5 encoder of ``length`` tokens from a model folder (``tokenizer`` None: its
    ``text_encoder/`` and ``tokenizer/``) or a weight file + tokenizer folder (a folder of
    tokenizers, ComfyUI's, gives its ``t5_tokenizer``)."""
    from ..text import load_t5

    path = Path(path)
    if tokenizer is None:
        return load_t5(path / "text_encoder", path / "tokenizer", dtype=dtype, device=device, max_length=length)
    if (Path(tokenizer) / "t5_tokenizer").is_dir():
        tokenizer = Path(tokenizer) / "t5_tokenizer"
    return load_t5(path, tokenizer, dtype=dtype, device=device, max_length=length)


# ----------------------------------------------------------------------------------------------
# the registry

FAMILIES: dict[str, Family] = {}

# formats no registered family loads: named in errors so users learn what they picked
OTHER_SIGNATURES: tuple[Signature, ...] = (
    Signature("a LoRA", lambda k: any(".lora_" in x or "lora_down" in x or "lora_A" in x for x in k), part="lora"),
    Signature("a UNet (Stable Diffusion family)", lambda k: any(x.startswith("model.diffusion_model.input_blocks.") or x.startswith("input_blocks.") for x in k)),
)


def register(family: Family) -> Family:
    """Add a family (replacing one of the same name); returns it."""
    if not family.name:
        raise ValueError("a family needs a name")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def signatures() -> list[Signature]:
    """Every known file kind, the families' first (in registration order)."""
    return [s for f in FAMILIES.values() for s in f.signatures] + list(OTHER_SIGNATURES)


def detect(keys: Iterable[str]) -> Signature | None:
    """What a state dict with these keys is (None: nothing known)."""
    ks = set(keys)
    for sig in signatures():
        if sig.test(ks):
            return sig
    return None


def describe(keys: Iterable[str]) -> str:
    """What a state dict looks like, in words."""
    ks = set(keys)
    sig = detect(ks)
    if sig is not None:
        return sig.label
    return f"an unrecognised state dict ({len(ks)} tensors, e.g. {', '.join(sorted(ks)[:3])})"


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def for_folder(folder: str | Path) -> Family:
    """The family of a model folder; a one-line error when no family recognises it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a model folder (model_index.json, transformer/, vae/, ...)")
    for family in FAMILIES.values():
        if family.recognises_folder(folder):
            return family
    index = folder / "model_index.json"
    what = f"a {read_json(index).get('_class_name') or 'unknown'} pipeline" if index.is_file() else "no model_index.json"
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise CheckpointError(f"{folder}: not a model folder of any supported family ({what}); expected one of {known}")


def file_keys(path: str | Path) -> set[str]:
    """Key names of a weight file (safetensors headers only; pickles are loaded safely)."""
    keys: set[str] = set()
    for f in weight_files(path):
        keys |= set(safetensors_keys(f)) if f.suffix == ".safetensors" else set(load_state_dict(f).keys())
    return keys


def for_file(path: str | Path, part: str) -> Family:
    """The family whose ``part`` this weight file is; a one-line error naming what it looks like."""
    keys = file_keys(path)
    for s in signatures():  # a combined checkpoint holds every part
        if s.part in (part, "checkpoint") and s.family is not None and s.test(keys):
            return FAMILIES[s.family]
    wanted = {"transformer": "a diffusion transformer", "vae": "a VAE", "text_encoder": "a text encoder"}.get(part, part)
    raise CheckpointError(f"{path}: expected {wanted} of a supported family ({', '.join(f.label for f in FAMILIES.values())}), but this looks like {describe(keys)}")


def for_transformer(transformer: nn.Module) -> Family:
    """The family of a loaded transformer."""
    for family in FAMILIES.values():
        if family.owns(transformer):
            return family
    raise ValueError(f"{type(transformer).__name__} belongs to no registered model family")


def resolution_choices() -> list[str]:
    """Every family's trained sizes, as the Empty Latent node offers them: "HunyuanDiT 1024x768",
    "Open-Sora 240p 16:9 424x240" (the size last)."""
    out = []
    for f in FAMILIES.values():
        named = {wh: name for name, wh in f.named_resolutions.items()}
        out += [f"{f.label} {named[(w, h)]} {w}x{h}" if (w, h) in named else f"{f.label} {w}x{h}" for w, h in f.resolutions]
    return out


def duration_choices() -> list[str]:
    """Every family's named frame counts, as the Empty Latent node offers them: "Open-Sora 2s (51 frames)"."""
    return [f"{f.label} {name} ({n} frame{'s' if n != 1 else ''})" for f in FAMILIES.values() for name, n in f.durations.items()]


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) of ``WxH`` or a release's size name ("240p 16:9"; "240p" alone: its 16:9)."""
    t = text.strip()
    parts = t.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    names = {n.lower(): wh for f in FAMILIES.values() for n, wh in f.named_resolutions.items()}
    key = t.lower() if t.lower() in names else f"{t.lower()} 16:9"
    if key in names:
        return names[key]
    known = sorted({n for f in FAMILIES.values() for n in f.named_resolutions})
    raise ValueError(f"resolution {text!r}: expected WxH (e.g. 720x480) or a release's size name ({', '.join(known) or 'none'})")


def parse_duration(text: str) -> int:
    """Frames of a release's duration name ("2s": 51) or of a plain number."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    for f in FAMILIES.values():
        if t in f.durations:
            return f.durations[t]
    known = sorted({n for f in FAMILIES.values() for n in f.durations})
    raise ValueError(f"duration {text!r}: expected a frame count or a release's duration ({', '.join(known) or 'none'})")


def vae_variants() -> list[str]:
    """Every family's VAE presets (the VAE loader node's choices)."""
    return [v for f in FAMILIES.values() for v in f.vae_variants]


from . import cogvideox, hunyuandit, opensora  # noqa: E402  (each registers itself, in this order)

__all__ = ["bf16_native", "half_dtype", "folder_defaults", "SCHEDULER_SAMPLERS", "Family", "Signature", "FAMILIES", "register", "unregister", "detect", "describe", "get", "for_folder", "for_file",
           "for_transformer", "vae_variants", "resolution_choices", "duration_choices", "parse_resolution", "parse_duration", "multiple_problem", "neighbours", "cogvideox", "hunyuandit", "opensora"]
