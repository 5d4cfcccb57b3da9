"""CogVideoX transformer (THUDM): every released variant.

* 2B: fixed 3D sin-cos positions.  5B: 3D RoPE.  5B-I2V: 32 input channels + learned positions.
* 1.5-5B (+I2V): temporal patch 2 through a Linear patch embedding, "slice" RoPE grid, and for
  I2V an ``ofs`` embedding.

Text and video tokens are concatenated and attend jointly; each block modulates both streams
with their own shift/scale/gate ("expert adaLN") from the timestep embedding. Parameter names
are those of the official diffusers checkpoints; SAT checkpoints are converted in memory.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..attention import attention
from ..checkpoint import known_fields
from ..layers import FeedForward, Linear, TimestepMLP, patch_tokens, rope_3d, rope_rotations, rotate_, sincos_3d, timestep_embedding
from ..offload import on_device
from ..step_cache import StepCache, run_blocks


@dataclass(frozen=True)
class CogVideoXConfig:
    """Architecture of a CogVideoX transformer (names as in diffusers' ``config.json``)."""

    num_layers: int = 30
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16  # 32 for image-to-video: noise latents + image latents
    out_channels: int = 16
    text_embed_dim: int = 4096  # T5-v1.1-XXL
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5-I2V only
    patch_size: int = 2
    patch_size_t: int | None = None  # 2 for CogVideoX 1.5 (Linear patch embedding)
    use_rotary_positional_embeddings: bool = False  # False: fixed 3D sin-cos (2B)
    use_learned_positional_embeddings: bool = False  # 5B-I2V
    sample_height: int = 60  # latent grid the model was trained on (RoPE crop region, learned positions)
    sample_width: int = 90
    sample_frames: int = 49  # pixel frames
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    spatial_interpolation_scale: float = 1.875  # sin-cos only
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    attention_bias: bool = True
    patch_bias: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    ofs: float = 2.0  # the offset the 1.5-I2V release is always run with

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def is_v15(self) -> bool:
        return self.patch_size_t is not None

    @classmethod
    def from_diffusers(cls, config: dict) -> "CogVideoXConfig":
        """From a diffusers ``transformer/config.json`` dict (unknown keys ignored)."""
        kw = known_fields(cls, config)
        if kw.get("out_channels") is None:
            kw["out_channels"] = 16
        return cls(**kw)

    def to_diffusers(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("ofs")
        return {"_class_name": "CogVideoXTransformer3DModel", **d}


_5B = CogVideoXConfig(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True)
_15 = dataclasses.replace(_5B, patch_size_t=2, sample_height=300, sample_width=300, sample_frames=81, patch_bias=False)
PRESETS: dict[str, CogVideoXConfig] = {
    "cogvideox-2b": CogVideoXConfig(),
    "cogvideox-5b": _5B,
    "cogvideox-5b-i2v": dataclasses.replace(_5B, in_channels=32, use_learned_positional_embeddings=True),
    "cogvideox1.5-5b": _15,
    "cogvideox1.5-5b-i2v": dataclasses.replace(_15, in_channels=32, ofs_embed_dim=512),
}


# ----------------------------------------------------------------------------------------------
# modules


class PatchEmbed(nn.Module):
    """Video latents -> tokens (Conv2d per frame for 1.0, Linear over t x h x w patches for 1.5),
    text embeddings -> tokens, and the learned positional table of 5B-I2V."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        p, pt, d = cfg.patch_size, cfg.patch_size_t, cfg.inner_dim
        if pt is None:
            self.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p, bias=cfg.patch_bias)
        else:
            self.proj = Linear(cfg.in_channels * pt * p * p, d)
        self.text_proj = Linear(cfg.text_embed_dim, d)
        if cfg.use_learned_positional_embeddings:
            t = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            n = t * (cfg.sample_height // p) * (cfg.sample_width // p)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + n, d), persistent=True)
        self.p, self.pt = p, pt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, T'*H'*W', D], time-major then row-major
        b, c, t, h, w = x.shape
        p = self.p
        if self.pt is None:
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)
            tok = self.proj(frames)  # [B*T, D, H/p, W/p]
            return patch_tokens(tok).reshape(b, t * (h // p) * (w // p), -1)
        pt = self.pt
        patches = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // p) * (w // p), c * pt * p * p)
        return self.proj(patches)


class AdaLayerNormZero(nn.Module):
    """LayerNorm shared by text and video, with (shift, scale, gate) per stream from temb."""

    def __init__(self, time_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = Linear(time_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, vid, text, temb):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=2)
        vid = torch.addcmul(shift, self.norm(vid), 1 + scale)  # norm(x) * (1 + scale) + shift, one pass
        text = torch.addcmul(t_shift, self.norm(text), 1 + t_scale)
        return vid, text, gate, t_gate


class JointAttention(nn.Module):
    """Full attention over [text; video] with per-head QK LayerNorm and RoPE on video tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = Linear(dim, inner, bias=bias)
        self.to_k = Linear(dim, inner, bias=bias)
        self.to_v = Linear(dim, inner, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([Linear(inner, dim, bias=True)])
        self.backend: str | None = None  # attention backend override (None: automatic)
        self.parallel = None  # a vdit_core.parallel.SequenceParallel: vid holds this rank's part of the video tokens

    def forward(self, vid: torch.Tensor, text: torch.Tensor, rope: torch.Tensor | None):
        # rope: the video tokens' rotations [N, Dh/2, 2] (cos, sin), from rope_rotations
        n_text = text.shape[1]
        x = torch.cat([text, vid], dim=1)  # [B, L+N, D]
        b, s, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, s, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(b, s, self.heads, self.head_dim))
        v = self.to_v(x).view(b, s, self.heads, self.head_dim)
        if rope is not None:  # q and k are fresh tensors: rotate their video tokens in place
            rotate_(q[:, n_text:], rope)
            rotate_(k[:, n_text:], rope)
        if self.parallel is None:
            out = attention(q, k, v, backend=self.backend)
        else:  # the text tokens, alike on every rank, go first
            out = self.parallel.attention(q, k, v, prefix=n_text, backend=self.backend)
        out = out.reshape(b, s, -1)  # [B, L+N, H*Dh]
        out = self.to_out[0](out)
        return out[:, n_text:], out[:, :n_text]


class CogVideoXBlock(nn.Module):
    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(cfg.time_embed_dim, d, cfg.norm_eps)
        self.attn1 = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias)
        self.norm2 = AdaLayerNormZero(cfg.time_embed_dim, d, cfg.norm_eps)
        self.ff = FeedForward(d)

    def forward(self, vid, text, temb, rope):
        # vid: [B, N, D], text: [B, L, D], temb: [B, Dt]
        n_vid, n_text, gate, t_gate = self.norm1(vid, text, temb)
        a_vid, a_text = self.attn1(n_vid, n_text, rope)
        vid = torch.addcmul(vid, gate, a_vid)
        text = torch.addcmul(text, t_gate, a_text)
        n_vid, n_text, gate, t_gate = self.norm2(vid, text, temb)
        ff = self.ff(torch.cat([n_text, n_vid], dim=1))  # one MLP for both streams
        n_t = text.shape[1]
        return torch.addcmul(vid, gate, ff[:, n_t:]), torch.addcmul(text, t_gate, ff[:, :n_t])


class AdaLayerNormOut(nn.Module):
    """Final modulation: LayerNorm(x) * (1 + scale) + shift, (shift, scale) from temb."""

    def __init__(self, time_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = Linear(time_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, temb):
        shift, scale = self.linear(F.silu(temb))[:, None].chunk(2, dim=2)
        return torch.addcmul(shift, self.norm(x), 1 + scale)


class CogVideoXTransformer(nn.Module):
    """The CogVideoX diffusion transformer.

    ``forward(x, timestep, context, concat=None, ofs=None)``: latents ``x`` [B, C, T, H, W]
    (T a multiple of ``patch_size_t`` for 1.5), float timesteps [B], T5 embeddings ``context``
    [B, L, 4096]; image-to-video variants take the image latents as ``concat`` (joined to ``x``
    along channels). Returns the v-prediction [B, out_channels, T, H, W].
    """

    # the Linears a LoRA adapts by default (a regex over module names): attention q/k/v/out, FFN
    lora_targets = r"transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"

    def __init__(self, config: CogVideoXConfig):
        super().__init__()
        self.config = config
        cfg, d = config, config.inner_dim
        if cfg.use_learned_positional_embeddings and not cfg.use_rotary_positional_embeddings:
            raise ValueError("learned positions without RoPE match no CogVideoX release")
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepMLP(d, cfg.time_embed_dim)
        self.ofs_embedding = TimestepMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm_out = AdaLayerNormOut(cfg.time_embed_dim, d, cfg.norm_eps)
        pt = cfg.patch_size_t or 1
        self.proj_out = Linear(d, cfg.patch_size**2 * pt * cfg.out_channels)
        self.gradient_checkpointing = False
        self.step_cache: StepCache | None = None  # set for a sampling run (vdit_core.step_cache)
        self.parallel = None  # a vdit_core.parallel.SequenceParallel splitting the video tokens, or None

    def set_sequence_parallel(self, sp) -> None:
        """Split the video tokens over ``sp``'s ranks (None: one process)."""
        if sp is not None:
            sp.check_heads(self.config.num_attention_heads)
        self.parallel = sp
        for block in self.transformer_blocks:
            block.attn1.parallel = sp

    def set_attention_backend(self, backend: str | None) -> None:
        """Use one attention backend for every block (None: automatic)."""
        for block in self.transformer_blocks:
            block.attn1.backend = backend

    def _positions(self, t: int, h: int, w: int, device, dtype):
        """(additive table for video tokens or None, RoPE rotations or None) for a t x h x w token grid."""
        cfg = self.config
        p = cfg.patch_size
        add, rope = None, None
        if not cfg.use_rotary_positional_embeddings:
            add = sincos_3d(cfg.inner_dim, t, h, w, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale)
            add = add.to(device=device, dtype=dtype)[None]
        else:
            grid = "slice" if cfg.is_v15 else "linspace"
            rope = rope_rotations(*rope_3d(cfg.attention_head_dim, t, h, w, grid, cfg.sample_height // p, cfg.sample_width // p), device)
        return add, rope

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        concat: torch.Tensor | None = None,
        ofs: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        dtype = self.norm_final.weight.dtype  # (not a linear layer's: those may hold float8)
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        b, c, t, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"CogVideoX transformer expects {cfg.in_channels} input channels, got {c}" + (
                " (image-to-video models need the image latents as `concat`)" if cfg.in_channels == 2 * cfg.out_channels and concat is None else ""))
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if h % p or w % p or t % pt:
            raise ValueError(f"latent size {t}x{h}x{w} is not divisible by the patch size {pt}x{p}x{p}")
        x = x.to(dtype)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(timestep, cfg.inner_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        if self.ofs_embedding is not None:
            ofs = torch.as_tensor(cfg.ofs if ofs is None else ofs, device=x.device, dtype=torch.float32).reshape(-1)
            temb = temb + self.ofs_embedding(timestep_embedding(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))

        text = self.patch_embed.text_proj(context.to(dtype))  # [B, L, D]
        vid = self.patch_embed(x)  # [B, N, D]
        tt, hh, ww = t // pt, h // p, w // p
        add, rope = self._positions(tt, hh, ww, x.device, dtype)
        if add is not None:
            vid = vid + add
        if cfg.use_learned_positional_embeddings:
            table = self.patch_embed.pos_embedding.to(x.device, dtype)  # device too: a host that streams layers may leave it behind
            n_text, n_vid = text.shape[1], vid.shape[1]
            if table.shape[1] - cfg.max_text_seq_length < n_vid:
                raise ValueError(
                    f"this model's learned positions cover {cfg.sample_frames} frames at "
                    f"a {cfg.sample_height}x{cfg.sample_width} latent grid; the input has more tokens"
                )
            text = text + table[:, :n_text]
            # the video grid must equal the trained one in H and W; fewer frames use a prefix
            vid = vid + table[:, cfg.max_text_seq_length : cfg.max_text_seq_length + n_vid]

        sp = self.parallel
        if sp is not None:  # this rank's part of the video tokens: [B, N/W, D]
            vid = sp.split(vid, 1)
            rope = sp.split(rope, 0) if rope is not None else None

        def blocks(vid: torch.Tensor) -> torch.Tensor:
            text_ = text
            for block in self.transformer_blocks:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    vid, text_ = checkpoint(block, vid, text_, temb, rope, use_reentrant=False)
                else:
                    vid, text_ = block(vid, text_, temb, rope)
            return vid

        def signal() -> torch.Tensor:  # the first block's modulated video tokens (every rank's, so all decide alike)
            with on_device(self.transformer_blocks[0]):  # block swap may stream it
                first = self.transformer_blocks[0].norm1(vid, text, temb)[0]
            return first if sp is None else sp.gather(first, 1)

        # with a step cache, the signal tells how much this step's input changed
        vid = run_blocks(self.step_cache, vid, blocks, signal, context)

        vid = self.norm_out(self.norm_final(vid), temb)
        out = self.proj_out(vid)  # [B, N, C_out * pt * p * p]
        if sp is not None:
            out = sp.gather(out, 1)
        co = cfg.out_channels
        out = out.reshape(b, tt, hh, ww, co, pt, p, p)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, co, t, h, w)
        return out


# ----------------------------------------------------------------------------------------------
# checkpoints: detection and SAT conversion

SAT_PREFIX = "model.diffusion_model."


def is_sat_state_dict(keys) -> bool:
    return any(k.startswith(SAT_PREFIX + "transformer.layers.") or k.startswith("transformer.layers.") for k in keys)


def is_diffusers_state_dict(keys) -> bool:
    return any(k.startswith("transformer_blocks.") and ".attn1.to_q." in k for k in keys) and any(
        k.startswith("patch_embed.") for k in keys
    )


_SAT_RENAMES = [
    # (official SAT name fragment, diffusers name fragment), applied in order
    ("transformer.final_layernorm", "norm_final"),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
    ("mixins.patch_embed", "patch_embed"),
    ("mixins.final_layer.norm_final", "norm_out.norm"),
    ("mixins.final_layer.linear", "proj_out"),
    ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("ofs_embed.0", "ofs_embedding.linear_1"),
    ("ofs_embed.2", "ofs_embedding.linear_2"),
    ("transformer.layers.", "transformer_blocks."),
    (".input_layernorm.", ".norm1.norm."),
    (".post_attention_layernorm.", ".norm2.norm."),
    (".attention.dense.", ".attn1.to_out.0."),
    (".mlp.dense_h_to_4h.", ".ff.net.0.proj."),
    (".mlp.dense_4h_to_h.", ".ff.net.2."),
]
_SAT_DROP = ("embed_tokens", "freqs_sin", "freqs_cos", "position_embedding")


def convert_sat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAT transformer weights -> diffusers names (fused QKV split, 12-way adaLN split)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key[len(SAT_PREFIX):] if key.startswith(SAT_PREFIX) else key
        if any(d in k for d in _SAT_DROP):
            continue
        m = re.fullmatch(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", k)
        if m:
            q, kk, v = value.chunk(3, dim=0)
            i, wb = m.groups()
            out[f"transformer_blocks.{i}.attn1.to_q.{wb}"] = q
            out[f"transformer_blocks.{i}.attn1.to_k.{wb}"] = kk
            out[f"transformer_blocks.{i}.attn1.to_v.{wb}"] = v
            continue
        m = re.fullmatch(r"mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)", k)
        if m:
            which, i, wb = m.groups()
            out[f"transformer_blocks.{i}.attn1.norm_{which[0]}.{wb}"] = value
            continue
        m = re.fullmatch(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)", k)
        if m:
            i, wb = m.groups()
            c = value.chunk(12, dim=0)
            # SAT orders the 12 chunks (video: shift, scale, gate x2 blocks) then (text: ...)
            out[f"transformer_blocks.{i}.norm1.linear.{wb}"] = torch.cat(c[0:3] + c[6:9])
            out[f"transformer_blocks.{i}.norm2.linear.{wb}"] = torch.cat(c[3:6] + c[9:12])
            continue
        for a, b in _SAT_RENAMES:
            k = k.replace(a, b)
        out[k] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], base: CogVideoXConfig | None = None) -> CogVideoXConfig:
    """A config read off diffusers-named weights; what the weights cannot tell (trained sample
    size, sin-cos vs RoPE) comes from ``base`` or the closest release (RoPE unless 1920 wide)."""
    try:
        proj = sd["patch_embed.proj.weight"]
        d = proj.shape[0]
        head_dim = sd["transformer_blocks.0.attn1.norm_q.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
        text_dim = sd["patch_embed.text_proj.weight"].shape[1]
        time_dim = sd["time_embedding.linear_1.weight"].shape[0]
        out_w = sd["proj_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a CogVideoX transformer state dict (missing {e})") from None
    p = base.patch_size if base else 2
    v15 = proj.ndim == 2
    pt = 2 if v15 else None
    in_ch = proj.shape[1] // (pt * p * p) if v15 else proj.shape[1]
    out_ch = out_w // (p * p * (pt or 1))
    ofs_dim = sd["ofs_embedding.linear_1.weight"].shape[1] if "ofs_embedding.linear_1.weight" in sd else None
    learned = "patch_embed.pos_embedding" in sd
    if base is None:
        name = "cogvideox1.5-5b" if v15 else ("cogvideox-2b" if d == 1920 else "cogvideox-5b")
        if in_ch == 2 * out_ch:
            name += "-i2v"
        base = PRESETS[name]
    return dataclasses.replace(
        base,
        num_layers=layers,
        num_attention_heads=d // head_dim,
        attention_head_dim=head_dim,
        in_channels=in_ch,
        out_channels=out_ch,
        text_embed_dim=text_dim,
        time_embed_dim=time_dim,
        ofs_embed_dim=ofs_dim,
        patch_size_t=pt,
        use_learned_positional_embeddings=learned,
        use_rotary_positional_embeddings=base.use_rotary_positional_embeddings or learned,
        patch_bias="patch_embed.proj.bias" in sd if not v15 else base.patch_bias,
    )


def preset_name(cfg: CogVideoXConfig) -> str | None:
    """The release a config matches, if any."""
    for name, preset in PRESETS.items():
        if preset == cfg:
            return name
    return None


def load_transformer(
    path,
    dtype: torch.dtype | None = torch.float32,
    device="cpu",
    config: CogVideoXConfig | None = None,
) -> CogVideoXTransformer:
    """A CogVideoX transformer from a diffusers folder (config.json + weights, sharded or not), a
    single safetensors file (diffusers names), or an official SAT checkpoint (.pt or
    safetensors). The variant is read off the weights unless ``config`` is given."""
    from ..checkpoint import load_model

    return load_model(
        path, build=CogVideoXTransformer, expected="a CogVideoX transformer", recognise=is_diffusers_state_dict,
        from_json=CogVideoXConfig.from_diffusers, infer_config=infer_config, dtype=dtype, device=device, config=config,
        convert=(is_sat_state_dict, convert_sat), label=lambda c: f"a CogVideoX transformer ({preset_name(c) or 'custom config'})",
    )


def save_transformer(model: CogVideoXTransformer, folder, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30, state_dict: dict | None = None) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (sharded with an index JSON
    above ``max_shard_bytes``): the diffusers layout, loadable by :func:`load_transformer`;
    switched in whole over an earlier save."""
    from ..checkpoint import save_diffusers_folder

    save_diffusers_folder(folder, model.config.to_diffusers(), state_dict if state_dict is not None else model.state_dict(), dtype,
                          max_shard_bytes)
