"""Sampling cases shared by the native-model tests: a tiny random transformer of each family (and
the shipped demo), with seeded noise and conditioning. ``test_native.py`` runs them through
ComfyUI's KSampler and saves what it gives (``tests/fixtures/native/<name>.safetensors``);
``test_native_fixtures.py`` runs vdit_core's pipeline against those files where ComfyUI is absent.

Every tensor comes from seeded ``torch.randn`` in float32 (CPU): the cases are the same on every
machine, and the fixtures hold only ComfyUI's outputs and sigmas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vdit_core import families
from vdit_core.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vdit_core.models.hunyuan_dit import HunyuanDiT, HunyuanDiTConfig
from vdit_core.models.opensora import STDiT3, STDiT3Config

FIXTURES = Path(__file__).parent / "fixtures" / "native"
NAMES = ("demo", "cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox-1.5", "hunyuandit-v1.2", "opensora", "opensora-null",
         "opensora-i2v")


@dataclass
class Case:
    family: families.Family
    transformer: torch.nn.Module
    defaults: dict  # the family's sampling defaults (schedule, sampler, steps, cfg, vae_scale)
    cond: dict
    uncond: dict
    noise: torch.Tensor  # [1, C, T, h, w]
    steps: int
    cfg: float
    frame_latents: torch.Tensor | None = None  # image-to-video: the first frame's latents [1, C, 1, h, w], model space


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight drawn at random (zero-initialised gates would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def demo_folder() -> Path:
    from vdit_core.demo import demo_model_path

    return demo_model_path()


def case(name: str) -> Case:
    g = torch.Generator().manual_seed(1234)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if name == "demo":
        from vdit_core.pipeline import load_pipeline

        pipe = load_pipeline(demo_folder(), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            cond = pipe.encode_prompt("a green square moving down")
            uncond = pipe.encode_prompt("")
        defaults = dict(schedule=pipe.schedule, sampler=pipe.sampler, steps=pipe.steps, cfg=pipe.cfg, vae_scale=pipe.spatial_scale,
                        latent_rgb=pipe.latent_rgb)
        return Case(pipe.family, pipe.transformer, defaults, cond, uncond, randn(1, 2, 5, 8, 8), 8, 5.0)
    if name.startswith("cogvideox"):
        i2v, v15 = name.endswith("-i2v"), name.endswith("1.5")
        # 1.5: frames in pairs (temporal patch 2), no patch bias, a larger RoPE crop region
        config = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, in_channels=8 if i2v else 4, out_channels=4,
                                 text_embed_dim=16, time_embed_dim=20, sample_height=10 if v15 else 4, sample_width=10 if v15 else 6,
                                 sample_frames=9, max_text_seq_length=8, use_rotary_positional_embeddings=not name.endswith("2b"),
                                 use_learned_positional_embeddings=i2v, patch_size_t=2 if v15 else None, patch_bias=not v15)
        family = families.get("cogvideox")
        transformer = _randomised(CogVideoXTransformer(config), 1)
        defaults = family.sampling_defaults(None, config)
        if name.endswith("2b"):  # the 2B schedule (SNR shift 3) though a tiny config is no preset
            from vdit_core.families.cogvideox import release_schedule
            from vdit_core.models.cogvideox import PRESETS
            from vdit_core.schedules import DiscreteSchedule

            defaults["schedule"] = DiscreteSchedule.from_config(release_schedule(PRESETS["cogvideox-2b"]))
        cond, uncond = {"context": randn(1, 8, 16)}, {"context": randn(1, 8, 16)}
        noise = randn(1, 4, 4 if v15 else 3, 4, 6)  # 1.5: 9 frames' 3 latent frames padded to 4, as its Empty Latent makes them
        return Case(family, transformer, defaults, cond, uncond, noise, 6, 6.0, randn(1, 4, 1, 4, 6) if i2v else None)
    if name.startswith("hunyuandit"):
        config = HunyuanDiTConfig(num_attention_heads=2, attention_head_dim=8, hidden_size=16, num_layers=4, cross_attention_dim=12,
                                  cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=5, text_len_t5=6, sample_size=8, mlp_ratio=2.0)
        family = families.get("hunyuandit")
        transformer = _randomised(HunyuanDiT(config), 2)

        def text():
            mask, mask_t5 = torch.ones(1, 5, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)
            mask[:, 3:], mask_t5[:, 4:] = 0, 0
            return {"context": randn(1, 5, 12), "context_mask": mask, "context_t5": randn(1, 6, 16), "context_t5_mask": mask_t5}

        return Case(family, transformer, family.sampling_defaults(None, config), text(), text(), randn(1, 4, 1, 6, 8), 6, 6.0)
    if name.startswith("opensora"):  # "-null": the negative is the learned null caption (an empty prompt), paired with the prompt's mask
        config = STDiT3Config(hidden_size=24, depth=2, num_heads=2, caption_channels=12, model_max_length=6)
        family = families.get("opensora")
        transformer = _randomised(STDiT3(config), 3)
        mask = torch.ones(1, 6, dtype=torch.long)
        mask[:, 4:] = 0
        cond = {"y": randn(1, 6, 12), "mask": mask, "drop_text": torch.tensor([False])}
        uncond = {"y": randn(1, 6, 12), "mask": mask, "drop_text": torch.tensor([False])}
        if name.endswith("-null"):
            empty = torch.zeros(1, 6, dtype=torch.long)
            empty[:, 0] = 1  # an empty prompt's mask: its end token
            uncond = {**uncond, "mask": empty, "drop_text": torch.tensor([True])}
        frames = randn(1, 4, 1, 4, 6) if name.endswith("-i2v") else None
        return Case(family, transformer, family.sampling_defaults(None, config), cond, uncond, randn(1, 4, 5, 4, 6), 5, 7.0, frames)
    raise KeyError(name)


def fixture_path(name: str) -> Path:
    return FIXTURES / f"{name}.safetensors"


def save_fixture(name: str, sigmas: torch.Tensor, latents: torch.Tensor) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file({"sigmas": sigmas.float().contiguous(), "latents": latents.float().contiguous()}, str(fixture_path(name)))


def load_fixture(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_path(name)))


