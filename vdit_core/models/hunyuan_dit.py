"""HunyuanDiT (Tencent) v1.1 and v1.2: a text-to-image DiT with bilingual CLIP + mT5 conditioning.

* U-ViT long skips: blocks past the middle take the output of a mirrored earlier block
  (``skip_norm`` + ``skip_linear`` over the concatenation).
* Each block: shift-only adaLN before self-attention, cross-attention to the joined CLIP and
  projected mT5 states, GELU-tanh FFN; LayerNorms in float32; qk LayerNorm; 2D RoPE on q and k
  in self-attention and on q alone in cross-attention.
* Conditioning vector: timestep embedding + an MLP over [attention-pooled mT5 states
  (+ v1.1: six image-size sinusoids and a style embedding)].
* Masked text positions are replaced by the learned ``text_embedding_padding``.
* Output: 2C channels (learned-range sigma); samplers use the first C.

Parameter names are those of the diffusers checkpoints (``HunyuanDiT2DModel``); Tencent's
original files (``pytorch_model_ema.pt`` ...) are converted in memory. Images are one-frame
videos: latents [B, 4, 1, H/8, W/8].
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
from ..checkpoint import known_fields, unwrap_prefixes, unwrapped_keys
from ..layers import FeedForward, Linear, patch_tokens, rope_1d, rope_rotations, rotate_, timestep_embedding
from ..offload import on_device
from ..step_cache import StepCache, run_blocks


@dataclass(frozen=True)
class HunyuanDiTConfig:
    """Architecture of a HunyuanDiT transformer (names as in diffusers' ``config.json``)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1408
    num_layers: int = 40
    mlp_ratio: float = 4.3637
    learn_sigma: bool = True
    cross_attention_dim: int = 1024  # the CLIP (BERT) width
    cross_attention_dim_t5: int = 2048  # mT5-XL
    pooled_projection_dim: int = 1024
    text_len: int = 77
    text_len_t5: int = 256
    use_style_cond_and_image_meta_size: bool = False  # True for v1.1 and earlier
    sample_size: int = 128  # latent grid of the trained 1024x1024 images
    vae_scale: int = 8  # pixels per latent cell (image-size conditioning is in pixels)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def ff_inner_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, config: dict) -> "HunyuanDiTConfig":
        return cls(**known_fields(cls, config))

    def to_diffusers(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("vae_scale")
        return {"_class_name": "HunyuanDiT2DModel", "activation_fn": "gelu-approximate", "norm_type": "layer_norm", **d}


_G2 = HunyuanDiTConfig()
PRESETS: dict[str, HunyuanDiTConfig] = {
    "hunyuandit-v1.2": _G2,  # DiT-g/2
    "hunyuandit-v1.1": dataclasses.replace(_G2, use_style_cond_and_image_meta_size=True),
    "hunyuandit-xl-v1.2": dataclasses.replace(_G2, num_layers=28, hidden_size=1152, attention_head_dim=72, mlp_ratio=4.0),
}


# ----------------------------------------------------------------------------------------------
# modules


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype (as the release)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.device, torch.float32) if self.weight is not None else None
        b = self.bias.to(x.device, torch.float32) if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MLP(nn.Module):
    """Linear -> SiLU (in float32) -> Linear, names ``linear_1`` / ``linear_2``."""

    def __init__(self, cin: int, hidden: int, cout: int, fp32_act: bool = True):
        super().__init__()
        self.linear_1 = Linear(cin, hidden)
        self.linear_2 = Linear(hidden, cout)
        self.fp32_act = fp32_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h.float()).to(h.dtype) if self.fp32_act else F.silu(h)
        return self.linear_2(h)


class AttentionPool(nn.Module):
    """The mT5 states pooled by one attention query (their mean), 8 heads, into a vector."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(seq_len + 1, dim))
        self.k_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.c_proj = Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, L, C] -> [B, out_dim]; the query is the mean token (not mask-aware, as released)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.device, x.dtype)
        b, s, c = x.shape
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, c // self.heads)
        k = self.k_proj(x).view(b, s, self.heads, c // self.heads)
        v = self.v_proj(x).view(b, s, self.heads, c // self.heads)
        return self.c_proj(attention(q, k, v, backend="math").reshape(b, c))


class ConditionEmbedding(nn.Module):
    """Timestep + pooled mT5 (+ v1.1: image size and style) -> the conditioning vector [B, D]."""

    def __init__(self, cfg: HunyuanDiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.timestep_embedder = MLP(256, d, d, fp32_act=False)
        self.pooler = AttentionPool(cfg.text_len_t5, cfg.cross_attention_dim_t5, 8, cfg.pooled_projection_dim)
        self.use_meta = cfg.use_style_cond_and_image_meta_size
        if self.use_meta:
            self.style_embedder = nn.Embedding(1, d)
        extra_in = cfg.pooled_projection_dim + (256 * 6 + d if self.use_meta else 0)
        self.extra_embedder = MLP(extra_in, 4 * d, d)

    def forward(self, t, t5_states, image_meta_size, style, dtype):
        temb = self.timestep_embedder(timestep_embedding(t, 256, True, 0).to(dtype))  # [B, D]
        extra = [self.pooler(t5_states)]  # [B, 1024]
        if self.use_meta:
            b = t.shape[0]
            extra.append(timestep_embedding(image_meta_size.reshape(-1), 256, True, 0).to(dtype).reshape(b, 6 * 256))
            extra.append(self.style_embedder(style))
        return temb + self.extra_embedder(torch.cat(extra, dim=1))


class Attention(nn.Module):
    """Self- (``kv_dim`` None) or cross-attention with qk LayerNorm; RoPE on q (and k when self)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.cross = heads, head_dim, kv_dim is not None
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(kv_dim or dim, inner)
        self.to_v = Linear(kv_dim or dim, inner)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([Linear(inner, dim)])
        self.backend: str | None = None
        self.parallel = None  # self-attention: a vdit_core.parallel.SequenceParallel (x holds this rank's part of the tokens)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, N, D], context: [B, L, Dc] -> [B, N, D]; rope: rotations [N, Dh/2, 2] (cos, sin)
        b, n, _ = x.shape
        kv = x if context is None else context
        q = self.norm_q(self.to_q(x).view(b, n, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(kv).view(b, kv.shape[1], self.heads, self.head_dim))
        v = self.to_v(kv).view(b, kv.shape[1], self.heads, self.head_dim)
        rotate_(q, rope)  # q and k are fresh (the norms' outputs): rotated in place
        if not self.cross:
            rotate_(k, rope)
        if self.parallel is None:
            out = attention(q, k, v, backend=self.backend)
        else:
            out = self.parallel.attention(q, k, v, backend=self.backend)
        return self.to_out[0](out.reshape(b, n, -1))


class ShiftNorm(nn.Module):
    """float32 LayerNorm plus a shift from the conditioning vector (no scale, no gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, dim)
        self.norm = FP32LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift = self.linear(F.silu(temb.float()).to(temb.dtype))
        return self.norm(x) + shift[:, None]


class HunyuanDiTBlock(nn.Module):
    def __init__(self, cfg: HunyuanDiTConfig, skip: bool):
        super().__init__()
        d, h, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = ShiftNorm(d)
        self.attn1 = Attention(d, h, hd)
        self.norm2 = FP32LayerNorm(d, eps=1e-6)
        self.attn2 = Attention(d, h, hd, kv_dim=cfg.cross_attention_dim)
        self.norm3 = FP32LayerNorm(d, eps=1e-6)
        self.ff = FeedForward(d, inner_dim=cfg.ff_inner_dim)
        if skip:
            self.skip_norm = FP32LayerNorm(2 * d, eps=1e-6)
            self.skip_linear = Linear(2 * d, d)
        else:
            self.skip_linear = None

    def forward(self, x, temb, text, rope, skip=None):
        # x: [B, N, D], text: [B, 77 + 256, 1024]
        if self.skip_linear is not None:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))
        x = x + self.attn1(self.norm1(x, temb), rope)
        x = x + self.attn2(self.norm2(x), rope, text)
        return x + self.ff(self.norm3(x))


def rope_2d(head_dim: int, h: int, w: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanDiT's 2D RoPE tables [h*w, head_dim]: the token grid spread evenly over the region
    it would cover resized and centre-cropped into a ``base x base`` grid (``start + (stop -
    start) * i / n``, as Tencent's code does; diffusers' formula differs when the crop does not
    start at 0, i.e. for non-square sizes); the first half of the channels rotate with the
    column, the second with the row."""
    if h / w > 1:
        rh, rw = base, int(round(base / h * w))
    else:
        rw, rh = base, int(round(base / w * h))
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    ys = top + rh * torch.arange(h, dtype=torch.float32) / h
    xs = left + rw * torch.arange(w, dtype=torch.float32) / w
    cx, sx = rope_1d(head_dim // 2, xs[None].expand(h, w).reshape(-1))
    cy, sy = rope_1d(head_dim // 2, ys[:, None].expand(h, w).reshape(-1))
    return torch.cat([cx, cy], dim=1), torch.cat([sx, sy], dim=1)


class HunyuanDiT(nn.Module):
    """The HunyuanDiT transformer.

    ``forward(x, timestep, context, context_mask, context_t5, context_t5_mask, image_meta_size=None,
    style=None)``: latents ``x`` [B, 4, 1, H, W] (an image is a one-frame video), float timesteps
    [B], CLIP states [B, 77, 1024] and mT5 states [B, 256, 2048] with their masks [B, L]. v1.1
    also takes ``image_meta_size`` [B, 6] (default, as Tencent's inference: 1024, 1024, the image's
    width and height, 0, 0) and ``style`` [B] (default 0). Returns
    [B, 8, 1, H, W]: the v-prediction in the first 4 channels, the variance range in the rest.
    """

    # the Linears a LoRA adapts by default (a regex over module names): attention q/k/v/out, FFN
    lora_targets = r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"

    def __init__(self, config: HunyuanDiTConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.num_layers % 2:
            raise ValueError(f"HunyuanDiT needs an even number of layers for its long skips, got {cfg.num_layers}")
        d = cfg.inner_dim
        self.text_embedder = MLP(cfg.cross_attention_dim_t5, 4 * cfg.cross_attention_dim_t5, cfg.cross_attention_dim)
        self.text_embedding_padding = nn.Parameter(torch.zeros(cfg.text_len + cfg.text_len_t5, cfg.cross_attention_dim))
        self.pos_embed = nn.Module()
        self.pos_embed.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.time_extra_emb = ConditionEmbedding(cfg)
        self.blocks = nn.ModuleList([HunyuanDiTBlock(cfg, skip=i > cfg.num_layers // 2) for i in range(cfg.num_layers)])
        self.norm_out = nn.Module()
        self.norm_out.linear = Linear(cfg.hidden_size, 2 * d)
        self.norm_out.norm = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.proj_out = Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False
        self.step_cache: StepCache | None = None  # set for a sampling run (vdit_core.step_cache)
        self.parallel = None  # a vdit_core.parallel.SequenceParallel splitting the image tokens, or None

    def set_attention_backend(self, backend: str | None) -> None:
        for block in self.blocks:
            block.attn1.backend = block.attn2.backend = backend

    def set_sequence_parallel(self, sp) -> None:
        """Split the image tokens over ``sp``'s ranks (None: one process); cross-attention needs
        no exchange (its keys are the text, on every rank)."""
        if sp is not None:
            sp.check_heads(self.config.num_attention_heads)
        self.parallel = sp
        for block in self.blocks:
            block.attn1.parallel = sp

    def lora_modules(self, name: str) -> list[str]:
        """Tencent's LoRAs adapt the original modules: the fused ``Wqkv`` and ``kv_proj`` feed our
        split projections (rows in q, k, v order), the others are renamed."""
        m = re.fullmatch(r"blocks\.(\d+)\.attn([12])\.(Wqkv|kv_proj)", name)
        if m:
            return [f"blocks.{m[1]}.attn{m[2]}.to_{x}" for x in ("qkv" if m[3] == "Wqkv" else "kv")]
        if name.startswith("final_layer.adaLN"):  # (its rows are reordered, not renamed; no LoRA adapts it)
            return []
        target = next(iter(convert_original({name + ".weight": torch.zeros(0)}))).removesuffix(".weight")
        return [target] if target != name else []

    def lora_original_names(self) -> list[str]:
        """The names :meth:`lora_modules` maps: Tencent's for our Linears (a fused projection once)."""
        names = []
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            original = re.sub(r"\.attn1\.to_[qkv]$", ".attn1.Wqkv", name)
            original = re.sub(r"\.attn2\.to_[kv]$", ".attn2.kv_proj", original) + "."
            for theirs, ours in reversed(_ORIGINAL_RENAMES):
                original = original.replace(ours, theirs)
            original = original.removesuffix(".")
            if original not in names and name in self.lora_modules(original):
                names.append(original)
        return names

    def default_meta(self, batch: int, h: int, w: int, device) -> torch.Tensor:
        """v1.1's image-size conditioning for a latent grid, as Tencent's inference builds it:
        original 1024x1024, target (width, height) of the generated image, crop (0, 0)."""
        s = self.config.vae_scale
        return torch.tensor([[1024, 1024, w * s, h * s, 0, 0]], dtype=torch.float32, device=device).expand(batch, 6)

    def forward(self, x, timestep, context, context_mask, context_t5, context_t5_mask, image_meta_size=None, style=None):
        cfg = self.config
        dtype = self.pos_embed.proj.weight.dtype  # (not a linear layer's: those may hold float8)
        b, c, f, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels or f != 1:
            raise ValueError(f"HunyuanDiT takes images as one-frame latents [B, {cfg.in_channels}, 1, H, W], got {tuple(x.shape)}")
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        tokens = patch_tokens(self.pos_embed.proj(x[:, :, 0].to(dtype)))  # [B, N, D]
        if cfg.use_style_cond_and_image_meta_size:
            image_meta_size = self.default_meta(b, h, w, x.device) if image_meta_size is None else image_meta_size.to(x.device)
            style = torch.zeros(b, dtype=torch.long, device=x.device) if style is None else style.to(x.device).long()
        temb = self.time_extra_emb(timestep, context_t5.to(dtype), image_meta_size, style, dtype)  # [B, D]
        t5 = self.text_embedder(context_t5.to(dtype))  # [B, 256, 1024]
        text = torch.cat([context.to(dtype), t5], dim=1)
        mask = torch.cat([context_mask, context_t5_mask], dim=1).bool()[..., None]
        text = torch.where(mask, text, self.text_embedding_padding.to(x.device, dtype))  # masked positions: the learned padding
        rope = rope_rotations(*rope_2d(cfg.attention_head_dim, h // p, w // p, 512 // cfg.vae_scale // p), x.device)
        sp = self.parallel
        if sp is not None:  # this rank's part of the image tokens: [B, N/W, D]
            tokens, rope = sp.split(tokens, 1), sp.split(rope, 0)

        def blocks(tokens: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, block in enumerate(self.blocks):
                skip = skips.pop() if i > cfg.num_layers // 2 else None
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    tokens = checkpoint(block, tokens, temb, text, rope, skip, use_reentrant=False)
                else:
                    tokens = block(tokens, temb, text, rope, skip)
                if i < cfg.num_layers // 2 - 1:
                    skips.append(tokens)
            return tokens

        def signal() -> torch.Tensor:  # the first block's modulated input (every rank's, so all decide alike)
            with on_device(self.blocks[0]):  # block swap may stream it
                first = self.blocks[0].norm1(tokens, temb)
            return first if sp is None else sp.gather(first, 1)

        # with a step cache, the signal tells how much this step's input changed
        tokens = run_blocks(self.step_cache, tokens, blocks, signal, text)

        scale, shift = self.norm_out.linear(F.silu(temb.float()).to(dtype)).chunk(2, dim=1)
        tokens = self.norm_out.norm(tokens) * (1 + scale[:, None]) + shift[:, None]
        out = self.proj_out(tokens)  # [B, N, p*p*C_out]
        if sp is not None:
            out = sp.gather(out, 1)
        co = cfg.out_channels
        out = out.reshape(b, h // p, w // p, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, h, w)
        return out[:, :, None]


# ----------------------------------------------------------------------------------------------
# checkpoints: detection and Tencent's original layout


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "model.")  # the transformer in ComfyUI's single-file checkpoint


def is_checkpoint(keys) -> bool:
    """ComfyUI's single HunyuanDiT file: the transformer (original names) under ``model.``,
    ``vae.``, and both text encoders under ``text_encoders.``."""
    return any(k.startswith(("model.mlp_t5.", "model.diffusion_model.mlp_t5.")) for k in keys)


def is_diffusers_state_dict(keys) -> bool:
    return "text_embedder.linear_1.weight" in keys and any(k.startswith("blocks.") and ".attn2." in k for k in keys)


def is_original_state_dict(keys) -> bool:
    return "mlp_t5.0.weight" in keys


_ORIGINAL_RENAMES = [  # (Tencent's name fragment, diffusers' name fragment), applied in order
    (".attn1.q_norm.", ".attn1.norm_q."), (".attn1.k_norm.", ".attn1.norm_k."), (".attn1.out_proj.", ".attn1.to_out.0."),
    (".attn2.q_proj.", ".attn2.to_q."), (".attn2.q_norm.", ".attn2.norm_q."), (".attn2.k_norm.", ".attn2.norm_k."),
    (".attn2.out_proj.", ".attn2.to_out.0."), (".default_modulation.1.", ".norm1.linear."),
    (".mlp.fc1.", ".ff.net.0.proj."), (".mlp.fc2.", ".ff.net.2."),
    ("pooler.", "time_extra_emb.pooler."), ("t_embedder.mlp.0.", "time_extra_emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_extra_emb.timestep_embedder.linear_2."),
    ("extra_embedder.0.", "time_extra_emb.extra_embedder.linear_1."), ("extra_embedder.2.", "time_extra_emb.extra_embedder.linear_2."),
    ("x_embedder.proj.", "pos_embed.proj."), ("mlp_t5.0.", "text_embedder.linear_1."), ("mlp_t5.2.", "text_embedder.linear_2."),
    ("final_layer.linear.", "proj_out."),
]


def convert_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tencent's original HunyuanDiT weights -> diffusers names: fused projections split, norm2
    and norm3 swapped (diffusers numbers the cross-attention norm 2), the final adaLN's
    (shift, scale) reordered to (scale, shift), the style table cut to its one used row."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix("module.")
        m = re.fullmatch(r"blocks\.(\d+)\.attn1\.Wqkv\.(weight|bias)", k)
        if m:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"blocks.{m[1]}.attn1.{name}.{m[2]}"] = part
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.attn2\.kv_proj\.(weight|bias)", k)
        if m:
            for name, part in zip(("to_k", "to_v"), value.chunk(2, dim=0)):
                out[f"blocks.{m[1]}.attn2.{name}.{m[2]}"] = part
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.norm([123])\.(weight|bias)", k)
        if m:
            out[f"blocks.{m[1]}.{ {'1': 'norm1.norm', '2': 'norm3', '3': 'norm2'}[m[2]] }.{m[3]}"] = value
            continue
        if k.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = value.chunk(2, dim=0)
            out["norm_out.linear." + k.rsplit(".", 1)[1]] = torch.cat([scale, shift])
            continue
        if k == "style_embedder.weight":
            out["time_extra_emb.style_embedder.weight"] = value[:1]
            continue
        for a, b in _ORIGINAL_RENAMES:
            k = k.replace(a, b)
        out[k] = value
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> HunyuanDiTConfig:
    """A config read off diffusers-named weights (every field the weights determine)."""
    try:
        proj = sd["pos_embed.proj.weight"]
        head_dim = sd["blocks.0.attn1.norm_q.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        inner = sd["blocks.0.attn1.to_q.weight"].shape[0]
        ff = sd["blocks.0.ff.net.0.proj.weight"].shape[0]
        t5_dim = sd["text_embedder.linear_1.weight"].shape[1]
        cross = sd["text_embedder.linear_2.weight"].shape[0]
        pooled = sd["time_extra_emb.pooler.c_proj.weight"].shape[0]
        text_total = sd["text_embedding_padding"].shape[0]
        t5_len = sd["time_extra_emb.pooler.positional_embedding"].shape[0] - 1
        out_w = sd["proj_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a whole HunyuanDiT transformer (missing {e})") from None
    p = proj.shape[-1]
    return HunyuanDiTConfig(
        num_attention_heads=inner // head_dim, attention_head_dim=head_dim, in_channels=proj.shape[1], patch_size=p,
        hidden_size=proj.shape[0], num_layers=layers, mlp_ratio=ff / inner, learn_sigma=out_w // (p * p) == 2 * proj.shape[1],
        cross_attention_dim=cross, cross_attention_dim_t5=t5_dim, pooled_projection_dim=pooled, text_len=text_total - t5_len,
        text_len_t5=t5_len, use_style_cond_and_image_meta_size="time_extra_emb.style_embedder.weight" in sd,
    )


def preset_name(cfg: HunyuanDiTConfig) -> str | None:
    for name, preset in PRESETS.items():
        if dataclasses.replace(preset, mlp_ratio=cfg.mlp_ratio, sample_size=cfg.sample_size) == cfg and abs(preset.mlp_ratio - cfg.mlp_ratio) < 1e-3:
            return name
    return None


def load_transformer(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: HunyuanDiTConfig | None = None) -> HunyuanDiT:
    """A HunyuanDiT transformer from a diffusers folder, a safetensors file with diffusers or
    original names, Tencent's ``pytorch_model_ema.pt`` (read with ``weights_only=True``), or the
    ``model.`` part of ComfyUI's single-file checkpoint."""
    from ..checkpoint import load_model, read_part

    return load_model(
        path, state_dict=read_part(path, CHECKPOINT_PREFIXES, dtype, device), build=HunyuanDiT, expected="a HunyuanDiT transformer",
        recognise=is_diffusers_state_dict,
        from_json=HunyuanDiTConfig.from_diffusers, infer_config=infer_config, dtype=dtype, device=device, config=config,
        convert=(lambda k: is_original_state_dict(_strip(k)), lambda sd: convert_original(unwrap_prefixes(sd))),
        label=lambda c: f"a HunyuanDiT transformer ({preset_name(c) or 'custom config'})",
    )


def _strip(keys) -> set[str]:
    return unwrapped_keys(keys)  # Tencent's training checkpoints prefix ema. / module.


def save_transformer(model: HunyuanDiT, folder, dtype: torch.dtype | None = None, state_dict: dict | None = None) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers layout), switched in
    whole over an earlier save."""
    from ..checkpoint import save_diffusers_folder

    save_diffusers_folder(folder, model.config.to_diffusers(), state_dict if state_dict is not None else model.state_dict(), dtype)


__all__ = ["HunyuanDiT", "HunyuanDiTConfig", "PRESETS", "load_transformer", "save_transformer", "convert_original"]
