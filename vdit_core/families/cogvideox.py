"""CogVideoX (THUDM): 2B, 5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V, and the bundled demo model.

Facts: 4k+1 frames (4: the temporal compression its transformer config states, as its VAE's does;
the releases were trained on 8N+1, 1.5 on 16N+1), sizes a multiple of the VAE's compression times
the patch (16), 8 fps (1.5: 16), v-prediction on a zero-terminal-SNR DDPM schedule (SNR shift 3
for 2B, 1 for the 5B family), noise drawn per sample as [T, C, H, W] as the reference does, 1.5's
odd latent frame count padded at the front to the temporal patch, image-to-video by
concatenating the first frame's latents (zeros after it) along channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, read_json
from ..detect import Signature
from ..guidance import cogvideox_dynamic_cfg
from ..models import cogvideox as model
from ..prediction import VPrediction
from ..schedules import DiscreteSchedule, DiscreteScheduleConfig
from ..text import load_t5_encoder
from ..vae import cogvideox_vae as vae
from .base import Family, multiple_problem, neighbours
from .folder import folder_defaults
from .registry import register

TEXT_LENGTH = 226  # T5 tokens of every release
LORA_TARGETS = model.CogVideoXTransformer.lora_targets  # the transformer's own default (attention q/k/v/out, FFN)


def rules(config: model.CogVideoXConfig | None) -> model.CogVideoXConfig:
    """The config whose frame and size rules apply: ``config``, or without one the default config
    (every release shares its temporal compression and patch size)."""
    return config if config is not None else model.CogVideoXConfig()


def release_schedule(config: model.CogVideoXConfig) -> DiscreteScheduleConfig:
    """CogVideoX's released schedule: v-prediction, zero terminal SNR, trailing; SNR shift 3 for
    the 2B model, 1 for the 5B family."""
    shift = 3.0 if (config.inner_dim == 1920 and not config.use_rotary_positional_embeddings) else 1.0
    return DiscreteScheduleConfig(snr_shift_scale=shift, zero_terminal_snr=True, timestep_spacing="trailing")


class CogVideoX(Family):
    name = "cogvideox"
    label = "CogVideoX"
    signatures = (
        Signature("a CogVideoX transformer (diffusers layout)", model.is_diffusers_state_dict, "cogvideox", "transformer"),
        Signature("a CogVideoX transformer (SAT layout)", model.is_sat_state_dict, "cogvideox", "transformer", "sat"),
        Signature("a CogVideoX VAE (diffusers layout)", vae.is_diffusers_state_dict, "cogvideox", "vae"),
        Signature("a CogVideoX VAE (SAT layout)", vae.is_sat_state_dict, "cogvideox", "vae", "sat"),
        Signature("a T5 text encoder", lambda k: any(x.startswith("encoder.block.") for x in k), "cogvideox", "text_encoder"),
    )
    text_encoder_kind = "t5-v1_1-xxl"
    pipeline_classes = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
    vae_variants = tuple(vae.PRESETS)
    lora_targets = LORA_TARGETS
    presets = model.PRESETS
    text_length = TEXT_LENGTH
    resolutions = ((720, 480), (480, 720), (1360, 768), (768, 1360))  # (width, height): 1.0 (the demo's 64x64 is its own); 1.5
    text_state = "context"
    folder_parts = {"transformer": ("model_index.json", "transformer/config.json"), "vae": ("model_index.json", "vae/config.json"),
                    "text_encoder": ("model_index.json", "text_encoder/config.json", "tokenizer/")}
    noise_permute = (1, 0, 2, 3)  # the reference draws latents as [T, C, H, W] per sample
    # latent -> RGB preview factors for the 16-channel VAE (shared by 1.0 and 1.5), as published with
    # kijai's ComfyUI-CogVideoXWrapper (latent_preview.py), rounded; fitted there on scaled latents
    latent_rgb = (((0.1195, 0.0992, -0.0048), (-0.0012, 0.0550, 0.0213), (-0.0141, -0.0087, -0.0210), (0.0306, 0.1219, 0.0140),
                   (0.0927, 0.0303, 0.0508), (0.0379, 0.0494, 0.0586), (0.0177, 0.0088, 0.0360), (0.1061, 0.0234, 0.0572),
                   (0.1274, -0.0110, 0.0433), (-0.0187, 0.0822, 0.1061), (0.0084, 0.0762, 0.0930), (0.1294, 0.1236, 0.0448),
                   (0.0457, 0.0411, -0.0177), (0.0002, -0.0140, 0.0533), (0.0808, 0.1155, -0.0215), (-0.0152, -0.0058, 0.0722)),
                  (0.0, 0.0, 0.0))

    # -- detection and loading -----------------------------------------------------------------
    def owns(self, transformer: nn.Module) -> bool:
        return isinstance(transformer, model.CogVideoXTransformer)

    def load_transformer(self, path, dtype, device):
        return model.load_transformer(path, dtype=dtype, device=device)

    def load_vae(self, path, dtype, device, variant=None):
        if variant and variant not in vae.PRESETS:
            raise ValueError(f"variant {variant!r} is not a CogVideoX VAE; expected one of {', '.join(vae.PRESETS)}")
        return vae.load_vae(path, dtype=dtype, device=device, base=vae.PRESETS[variant] if variant else None)

    def load_text_encoder(self, path, dtype, device, tokenizer=None, max_length=0):
        cfg = Path(path) / "transformer" / "config.json"
        if not max_length and tokenizer is None and cfg.exists():  # a model folder says its length
            max_length = read_json(cfg).get("max_text_seq_length", TEXT_LENGTH)
        return load_t5_encoder(path, dtype, device, tokenizer, max_length or TEXT_LENGTH)

    def save_transformer(self, transformer, folder, dtype, state_dict=None):
        model.save_transformer(transformer, folder, dtype=dtype, state_dict=state_dict)

    def preset_name(self, config):
        return model.preset_name(config)

    # -- sampling ------------------------------------------------------------------------------
    def sampling_defaults(self, folder, config) -> dict:
        raw, sampler, extra = folder_defaults(folder)
        if raw is not None:
            if raw.get("prediction_type", "v_prediction") != "v_prediction":
                raise CheckpointError(f"{folder}: CogVideoX is v-prediction, its scheduler config says {raw.get('prediction_type')!r}")
            schedule_config = DiscreteScheduleConfig.from_diffusers(raw)
        else:
            schedule_config, sampler = release_schedule(config), "ddim"
        vae_config = Path(folder) / "vae" / "config.json" if folder else None
        scale = vae.CogVideoXVAEConfig.from_diffusers(read_json(vae_config)).spatial_compression if vae_config and vae_config.exists() else 8
        return {
            "schedule": DiscreteSchedule.from_config(schedule_config),
            "sampler": extra.get("sampler", sampler),
            "steps": int(extra.get("steps", 50)),
            "cfg": float(extra.get("cfg", 6.0)),
            "vae_scale": scale,
        }

    def denoiser(self, net, schedule):
        return VPrediction(net, schedule)

    def latent_scaling(self, folder, config):
        vae_config = Path(folder) / "vae" / "config.json" if folder else None
        if vae_config is not None and vae_config.exists():
            factor = vae.CogVideoXVAEConfig.from_diffusers(read_json(vae_config)).scaling_factor
        else:  # a single transformer file: its release's VAE (image-to-video releases share their base's)
            preset = self.preset_name(config) or "cogvideox-5b"
            factor = vae.PRESETS[preset.removesuffix("-i2v")].scaling_factor
        c = self.latent_channels(config)
        return (0.0,) * c, (float(factor),) * c

    def guidance_scale(self, cfg, steps, schedule, dynamic):
        return cogvideox_dynamic_cfg(cfg, steps, schedule.timestep) if dynamic else cfg

    def encode_text(self, text_encoder, prompt):
        return {"context": text_encoder.encode(prompt)}

    # -- geometry ------------------------------------------------------------------------------
    def fps(self, config) -> float:
        return 16 if config.is_v15 else 8

    def latent_channels(self, config) -> int:
        return config.out_channels

    def default_size(self, config, spatial_scale):
        if config.is_v15:  # its sample size is the RoPE crop region (300x300 latents), not its trained size
            width, height = self.resolutions[2]
            return config.sample_frames, height, width
        return config.sample_frames, config.sample_height * spatial_scale, config.sample_width * spatial_scale

    def frame_rule(self, config=None) -> str:
        return f"{rules(config).temporal_compression_ratio}k+1"

    def size_multiple(self, config=None, spatial_scale=8) -> int:
        return spatial_scale * rules(config).patch_size  # one transformer token

    def latent_frames(self, config, num_frames):
        t = (num_frames - 1) // config.temporal_compression_ratio + 1
        pt = config.patch_size_t or 1
        return t, -(-t // pt) * pt

    def size_problem(self, num_frames, height, width, config=None, spatial_scale=8, frames_label="num_frames"):
        tc = rules(config).temporal_compression_ratio
        if num_frames < 1 or (num_frames - 1) % tc:
            lo, hi = neighbours(num_frames, tc, 1)
            return f"{frames_label}={num_frames}: CogVideoX takes {self.frame_rule(config)} frames; nearest valid: {lo} or {hi}"
        step = self.size_multiple(config, spatial_scale)
        for label, v in (("height", height), ("width", width)):
            problem = multiple_problem(label, v, step)
            if problem:
                return problem
        if config is not None and config.use_learned_positional_embeddings:
            h0, w0 = config.sample_height * spatial_scale, config.sample_width * spatial_scale
            if (height, width) != (h0, w0):
                return f"this model has learned positions for {h0}x{w0} only; got {height}x{width}"
            if num_frames > config.sample_frames:
                return f"this model's learned positions cover at most {config.sample_frames} frames, got {num_frames}"
        return None

    def size_warning(self, num_frames, height, width, config, spatial_scale):
        trained = 16 if config.is_v15 else 8
        notes = []
        if (num_frames - 1) % trained:
            notes.append(f"num_frames={num_frames}: the CogVideoX{' 1.5' if config.is_v15 else ''} releases were trained on "
                         f"{trained}N+1 frames (e.g. {trained * 3 + 1}); other {self.frame_rule(config)} counts run but may look worse")
        if num_frames > 8 * config.sample_frames:  # runs, but for a long time and without coherence
            notes.append(f"num_frames={num_frames} is {num_frames / config.sample_frames:.0f}x the {config.sample_frames} frames this "
                         "model was trained on: expect an incoherent video, and attention time grows with the square of the length")
        return "; ".join(notes) or None

    def tokens(self, config, latent_shape):
        _, _, t, h, w = latent_shape
        p, pt = config.patch_size, config.patch_size_t or 1
        return config.max_text_seq_length + (t // pt) * (h // p) * (w // p), config.inner_dim

    def latent_problem(self, config, latents):
        problem = super().latent_problem(config, latents)
        pt = config.patch_size_t or 1
        if problem is None and latents.shape[2] % pt:
            problem = f"this model needs a multiple of {pt} latent frames (VDIT Empty Latent pads them)"
        return problem

    def pad_latents(self, config, latents):
        pt = config.patch_size_t or 1
        t = latents.shape[2]
        if t % pt:  # CogVideoX 1.5: pad with copies of the first latent frame, as its training does
            latents = torch.cat([latents[:, :, :1].expand(-1, -1, pt - t % pt, -1, -1), latents], dim=2)
        return latents

    # -- image conditioning --------------------------------------------------------------------
    def is_image_to_video(self, config) -> bool:
        return config.in_channels == 2 * config.out_channels

    def vae_info(self, vae_config):
        c = vae.CogVideoXVAEConfig.from_diffusers(vae_config)
        return {"scaling_factor": c.scaling_factor, "invert_scale_latents": c.invert_scale_latents}

    def image_latent_scale(self, vae_info):
        sf = float(vae_info["scaling_factor"])
        return 1 / sf if vae_info.get("invert_scale_latents") else sf  # 1.5 conditions on latents / scaling_factor

    def image_conditioning(self, config, image_latents, latent_t):
        z = image_latents[:, :, :1]
        c = self.latent_channels(config)
        if z.shape[1] != c:
            raise ValueError(f"the image latent has {z.shape[1]} channels; this model's latents have {c}")
        zeros = z.new_zeros(z.shape[0], c, latent_t - 1, *z.shape[3:])
        return {"concat": torch.cat([z, zeros], dim=2)}  # [B, C, T, h, w]: the first frame, then zeros

    # -- training ------------------------------------------------------------------------------
    def blocks(self, transformer):
        return transformer.transformer_blocks


FAMILY = register(CogVideoX())
