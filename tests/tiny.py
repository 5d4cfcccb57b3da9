"""Tiny random CogVideoX models built with diffusers (the reference) and saved in the official
layouts, for parity tests. Nothing here is downloaded."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

CORPUS = [
    "a red circle moving right",
    "a blue square moving up on a dark background",
    "a green triangle moving left",
    "a yellow circle moving down",
    "a white square, a purple triangle, a cat playing piano in the snow",
    "the quick brown fox jumps over the lazy dog",
]

TEXT_DIM = 16
COG2B_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    snr_shift_scale=3.0,
    set_alpha_to_one=True,
    clip_sample=False,
    num_train_timesteps=1000,
)

# tiny transformer configs of every released variant (diffusers argument names)
_BASE = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    text_embed_dim=TEXT_DIM,
    time_embed_dim=20,
    in_channels=4,
    out_channels=4,
    sample_height=4,
    sample_width=6,
    sample_frames=9,
    max_text_seq_length=226,
)
VARIANTS = {
    "2b": dict(),
    "5b": dict(use_rotary_positional_embeddings=True),
    "5b-i2v": dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, in_channels=8),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, sample_height=10, sample_width=10),
    "1.5-i2v": dict(
        use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, in_channels=8, ofs_embed_dim=20,
        sample_height=10, sample_width=10,
    ),
}
VAE = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_height=32, sample_width=48)


def transformer_kwargs(variant: str) -> dict:
    return {**_BASE, **VARIANTS[variant]}


@functools.lru_cache(maxsize=None)
def tokenizer_dir(root: str) -> Path:
    """A T5 tokenizer (sentencepiece, T5's special ids) trained on a small corpus, laid out like
    the official CogVideoX tokenizer folder."""
    from vdit_core.demo.build import make_tokenizer

    out = Path(root) / "tokenizer"
    if (out / "spiece.model").exists():
        return out
    return make_tokenizer(CORPUS * 20, out, vocab_size=48, max_length=226)


def tiny_t5(vocab: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg).eval()


def reference_pipeline(root: Path, variant: str, scheduler: str = "ddim", seed: int = 0, transformer: dict | None = None,
                       vae: dict | None = None):
    """A diffusers CogVideoX pipeline of tiny random models, saved under ``root/variant``;
    ``transformer`` / ``vae``: config fields replacing the tiny ones."""
    import diffusers
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    kw = {**transformer_kwargs(variant), **(transformer or {})}
    transformer = diffusers.CogVideoXTransformer3DModel(**kw).eval()
    vae_kw = {**VAE, **(vae or {})}
    if variant.startswith("1.5"):
        vae_kw.update(scaling_factor=0.7, invert_scale_latents=True)
    elif variant != "2b":
        vae_kw.update(scaling_factor=0.7)
    vae = diffusers.AutoencoderKLCogVideoX(**vae_kw).eval()
    with torch.no_grad():  # a sharp posterior, as trained VAEs have (random ones give std ~1)
        vae.encoder.conv_out.conv.bias[vae_kw["latent_channels"]:] = -20.0
    sched_cfg = dict(COG2B_SCHEDULER, snr_shift_scale=3.0 if variant == "2b" else 1.0)
    sched_cls = diffusers.CogVideoXDPMScheduler if scheduler == "dpm" else diffusers.CogVideoXDDIMScheduler
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(str(root))))
    cls = diffusers.CogVideoXImageToVideoPipeline if "i2v" in variant else diffusers.CogVideoXPipeline
    pipe = cls(tokenizer=tok, text_encoder=tiny_t5(), vae=vae, transformer=transformer, scheduler=sched_cls(**sched_cfg))
    out = root / f"{variant}-{scheduler}"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return pipe, out


# ----------------------------------------------------------------------------------------------
# the official SAT layouts, written from diffusers weights (the inverse of the published
# conversion rules), for loader tests


def to_sat_transformer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", k)
        if m:
            i, which, wb = m.groups()
            pending.setdefault(f"transformer.layers.{i}.attention.query_key_value.{wb}", {})[which] = v
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.attn1\.norm_([qk])\.(weight|bias)", k)
        if m:
            i, which, wb = m.groups()
            name = "query" if which == "q" else "key"
            out[f"mixins.adaln_layer.{name}_layernorm_list.{i}.{wb}"] = v
            continue
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.norm([12])\.linear\.(weight|bias)", k)
        if m:
            i, n, wb = m.groups()
            pending.setdefault(f"mixins.adaln_layer.adaLN_modulations.{i}.1.{wb}", {})[n] = v
            continue
        name = k
        for a, b in [
            ("norm_final", "transformer.final_layernorm"),
            ("patch_embed.pos_embedding", "mixins.pos_embed.pos_embedding"),
            ("patch_embed.", "mixins.patch_embed."),
            ("norm_out.norm", "mixins.final_layer.norm_final"),
            ("norm_out.linear", "mixins.final_layer.adaLN_modulation.1"),
            ("proj_out", "mixins.final_layer.linear"),
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("ofs_embedding.linear_1", "ofs_embed.0"),
            ("ofs_embedding.linear_2", "ofs_embed.2"),
            ("transformer_blocks.", "transformer.layers."),
            (".norm1.norm.", ".input_layernorm."),
            (".norm2.norm.", ".post_attention_layernorm."),
            (".attn1.to_out.0.", ".attention.dense."),
            (".ff.net.0.proj.", ".mlp.dense_h_to_4h."),
            (".ff.net.2.", ".mlp.dense_4h_to_h."),
        ]:
            name = name.replace(a, b)
        out[name] = v
    for name, parts in pending.items():
        if "query_key_value" in name:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            n1, n2 = parts["1"].chunk(6), parts["2"].chunk(6)
            out[name] = torch.cat([*n1[0:3], *n2[0:3], *n1[3:6], *n2[3:6]])
    out = {"model.diffusion_model." + k: v for k, v in out.items()}
    out["model.diffusion_model.mixins.pos_embed.freqs_sin"] = torch.zeros(3)  # dropped on load
    return out


def to_sat_vae(sd: dict[str, torch.Tensor], n_up: int = 4) -> dict[str, torch.Tensor]:
    out = {"loss.logvar": torch.zeros(1)}  # training-only keys present in 3d-vae.pt
    for k, v in sd.items():
        name = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", k)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.", name)
        if m:
            name = f"decoder.up.{n_up - 1 - int(m.group(1))}." + name[m.end():]
        name = name.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block.")
        name = name.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
        name = name.replace(".conv_shortcut.", ".nin_shortcut.")
        out[name] = v
    return out
