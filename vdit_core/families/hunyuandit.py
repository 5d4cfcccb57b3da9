"""HunyuanDiT (Tencent) v1.1 and v1.2: text-to-image and image-to-image.

Facts: an image is a one-frame video (latents [B, 4, 1, H/8, W/8]); sizes a multiple of 16, the
ten released resolutions trained (others warn); v-prediction with a learned variance range on a
DDPM scaled_linear schedule (beta_end 0.02 for v1.2, 0.03 for v1.1); each sampler spaced as
HunyuanDiT's own inference does (DDPM and DDIM "leading" with steps_offset 1, DPM-Solver++ 2M
"linspace"); DDPM, 100 steps, cfg 6 by default; a BERT and mT5 with their masks; v1.1's
image-size and style conditioning (original 1024x1024, target the requested size, crop 0, 0,
style 0: overridable through ``conditioning=``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, read_json
from ..detect import Signature
from ..models import hunyuan_dit as model
from ..prediction import VPrediction
from ..schedules import DiscreteSchedule, DiscreteScheduleConfig
from ..text import load_dual, load_dual_checkpoint
from ..vae import kl2d
from .base import Family, multiple_problem
from .folder import folder_defaults
from .registry import register

# (width, height) of the released training resolutions
RESOLUTIONS = ((1024, 1024), (1280, 1280), (1024, 768), (1152, 864), (1280, 960), (768, 1024), (864, 1152), (960, 1280),
               (1280, 768), (768, 1280))
SAMPLER_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace_round"}  # hydit/constants.py's SAMPLER_FACTORY
LORA_TARGETS = model.HunyuanDiT.lora_targets  # the transformer's own default


def release_schedule(config: model.HunyuanDiTConfig) -> DiscreteScheduleConfig:
    """HunyuanDiT's training schedule: scaled_linear 0.00085..0.02 (v1.1: 0.03), leading + 1."""
    end = 0.03 if config.use_style_cond_and_image_meta_size else 0.02
    return DiscreteScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=end, timestep_spacing="leading", steps_offset=1)


class HunyuanDiT(Family):
    name = "hunyuandit"
    label = "HunyuanDiT"
    signatures = (
        Signature("a HunyuanDiT transformer (diffusers layout)", model.is_diffusers_state_dict, "hunyuandit", "transformer"),
        Signature("a HunyuanDiT transformer (Tencent's original layout)", lambda k: model.is_original_state_dict(model._strip(k)),
                  "hunyuandit", "transformer", "original"),
        Signature("a HunyuanDiT checkpoint (ComfyUI's single file: transformer, text encoders, VAE)", model.is_checkpoint,
                  "hunyuandit", "checkpoint", "comfyui"),
        Signature("a 2D image VAE (Stable Diffusion family)", kl2d.is_diffusers_state_dict, "hunyuandit", "vae"),
        Signature("a 2D image VAE (Stable Diffusion family, original names)", kl2d.is_ldm_state_dict, "hunyuandit", "vae", "ldm"),
    )
    pipeline_classes = ("HunyuanDiTPipeline",)
    vae_variants = ()
    lora_targets = LORA_TARGETS
    prompt_note = "reads Chinese as well as English"
    presets = model.PRESETS
    resolutions = RESOLUTIONS
    caption_groups = (("context", "context_mask"), ("context_t5", "context_t5_mask"))  # each encoder dropped on its own
    text_state = "context"
    folder_parts = {"transformer": ("model_index.json", "transformer/config.json"), "vae": ("model_index.json", "vae/config.json"),
                    "text_encoder": ("model_index.json", "text_encoder/config.json", "tokenizer/", "text_encoder_2/config.json", "tokenizer_2/")}
    # the SDXL VAE's published latent -> RGB factors (ComfyUI's latent_formats.SDXL)
    latent_rgb = (((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                  (0.1084, -0.0175, -0.0011))

    def owns(self, transformer):
        return isinstance(transformer, model.HunyuanDiT)

    def load_transformer(self, path, dtype, device):
        return model.load_transformer(path, dtype=dtype, device=device)

    def load_vae(self, path, dtype, device, variant=None):
        if variant:
            raise ValueError(f"variant {variant!r}: HunyuanDiT's VAE has no variants (its scaling factor is SDXL's 0.13025)")
        # float16 is safe here: Tencent ships sdxl-vae-fp16-fix (Open-Sora's SDXL VAE is not, see its family)
        return kl2d.load_vae(path, dtype=dtype, device=device)

    def load_text_encoder(self, path, dtype, device, tokenizer=None, max_length=0):
        path = Path(path)
        if path.is_dir():
            return load_dual(path, dtype or torch.float32, device)
        # ComfyUI's single file: both encoders and the mT5 tokenizer inside; the BERT tokenizer is ComfyUI's own
        bert_tokenizer = Path(tokenizer) / "hydit_clip_tokenizer" if tokenizer is not None else None
        if bert_tokenizer is None or not bert_tokenizer.is_dir():
            bert_tokenizer = tokenizer
        if bert_tokenizer is None:
            raise CheckpointError(f"{path}: HunyuanDiT's single file needs the BERT tokenizer: run inside ComfyUI (its "
                                  "hydit_clip_tokenizer is used) or put a tokenizer/ folder (vocab.txt) next to the file")
        return load_dual_checkpoint(path, bert_tokenizer, dtype or torch.float32, device)

    def save_transformer(self, transformer, folder, dtype, state_dict=None):
        model.save_transformer(transformer, folder, dtype=dtype, state_dict=state_dict)

    def preset_name(self, config):
        return model.preset_name(config)

    # -- sampling ------------------------------------------------------------------------------
    def sampling_defaults(self, folder, config):
        raw, sampler, extra = folder_defaults(folder)
        if raw is not None:
            if raw.get("prediction_type", "v_prediction") != "v_prediction":
                raise CheckpointError(f"{folder}: HunyuanDiT is v-prediction, its scheduler config says {raw.get('prediction_type')!r}")
            # HunyuanDiT's inference offsets "leading" timesteps by 1 whatever the scheduler class says
            schedule_config = dataclasses.replace(DiscreteScheduleConfig.from_diffusers(raw), steps_offset=1)
        else:
            schedule_config, sampler = release_schedule(config), "ddpm"
        return {
            "schedule": DiscreteSchedule.from_config(schedule_config),
            "sampler": extra.get("sampler", sampler),
            "steps": int(extra.get("steps", 100)),
            "cfg": float(extra.get("cfg", 6.0)),
            "vae_scale": config.vae_scale,
        }

    def spacing(self, sampler):
        return SAMPLER_SPACING.get(sampler)

    def denoiser(self, net, schedule):
        return VPrediction(net, schedule, learned_variance=True)

    def latent_scaling(self, folder, config):
        vae_config = Path(folder) / "vae" / "config.json" if folder else None
        factor = self.vae_info(read_json(vae_config))["scaling_factor"] if vae_config is not None and vae_config.exists() else kl2d.KL2DConfig().scaling_factor
        c = self.latent_channels(config)
        return (0.0,) * c, (float(factor),) * c

    def encode_text(self, text_encoder, prompt):
        return text_encoder.encode(prompt)

    # -- geometry ------------------------------------------------------------------------------
    def fps(self, config):
        return 1

    def latent_channels(self, config):
        return config.in_channels

    def default_size(self, config, spatial_scale):
        return 1, config.sample_size * spatial_scale, config.sample_size * spatial_scale

    def frame_rule(self, config=None):
        return "1"

    def size_multiple(self, config=None, spatial_scale=8):
        return spatial_scale * (config if config is not None else model.HunyuanDiTConfig()).patch_size  # one transformer token

    def latent_frames(self, config, num_frames):
        return 1, 1

    def size_problem(self, num_frames, height, width, config=None, spatial_scale=8, frames_label="num_frames"):
        if num_frames != 1:
            return f"{frames_label}={num_frames}: HunyuanDiT makes images; nearest valid: 1"
        step = self.size_multiple(config, spatial_scale)
        return multiple_problem("height", height, step) or multiple_problem("width", width, step)

    def size_warning(self, num_frames, height, width, config, spatial_scale):
        if (width, height) not in RESOLUTIONS:
            near = min(RESOLUTIONS, key=lambda r: abs(math.log(r[0] / r[1]) - math.log(width / height)) + abs(r[0] * r[1] - width * height) / 2**21)
            return (f"{width}x{height}: HunyuanDiT was trained at ten resolutions (e.g. {near[0]}x{near[1]}, the nearest in "
                    "shape); other sizes run but may look worse")
        return None

    def tokens(self, config, latent_shape):
        _, _, _, h, w = latent_shape
        return (h // config.patch_size) * (w // config.patch_size), config.inner_dim

    def vae_info(self, vae_config):
        return {"scaling_factor": kl2d.KL2DConfig.from_diffusers(vae_config).scaling_factor}

    def blocks(self, transformer):
        return transformer.blocks


FAMILY = register(HunyuanDiT())

