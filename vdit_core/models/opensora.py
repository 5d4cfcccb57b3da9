"""Open-Sora 1.2's STDiT3 (hpcaitech, tag v1.2.0): a spatial-temporal DiT for text/image-to-video.

* Blocks alternate: a spatial block attends over the tokens of each frame, a temporal block over
  each token's frames (with RoPE on q and k after the qk RMSNorm). Both cross-attend to the
  projected T5 states of the prompt (its padding masked) and are modulated PixArt-style: a
  per-block ``scale_shift_table`` [6, D] plus ``t_block(t)``.
* t = timestep embedding + fps embedding. Conditioning frames (``x_mask`` False) are modulated
  with t = 0 instead: that is how an image or a video prefix conditions the sample.
* Positions: a 2D sin-cos table over the patch grid, scaled by the resolution (``sqrt(H*W) / 512``
  in pixels) and by ``round(sqrt(patches)) / side``; frames are told apart only by RoPE.
* Output: 2C channels (``pred_sigma``); samplers use the first C, the velocity ``x0 - noise``.

Parameter names are those of the released ``hpcai-tech/OpenSora-STDiT-v3`` ``model.safetensors``
(``spatial_blocks.0.attn.qkv.weight``...); ``module.`` / ``ema.`` prefixes of training
checkpoints are stripped. Latents are [B, 4, T, H/8, W/8] of Open-Sora's VAE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..attention import KeyMask, attention, key_mask
from ..checkpoint import known_fields, unwrap_prefixes, unwrapped_keys
from ..layers import Linear, linear_gelu, patch_tokens, rotate_, timestep_embedding
from ..offload import on_device
from ..step_cache import StepCache, run_blocks


@dataclass(frozen=True)
class STDiT3Config:
    """Architecture of an STDiT3 transformer (names as in the released ``config.json``)."""

    hidden_size: int = 1152
    depth: int = 28  # spatial blocks (and as many temporal ones)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    pred_sigma: bool = True
    caption_channels: int = 4096  # T5-v1.1-XXL
    model_max_length: int = 300  # text tokens (the learned null embedding has as many rows)
    qk_norm: bool = True
    input_sq_size: int = 512  # the resolution the positional table's scale is relative to
    class_dropout_prob: float = 0.1  # caption dropout in training (to the null embedding)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @classmethod
    def from_json(cls, config: dict) -> "STDiT3Config":
        return cls(**known_fields(cls, config))

    def to_json(self) -> dict:
        """The released config.json's fields (``STDiT3Config`` of the official code)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"architectures": ["STDiT3"], "model_type": "STDiT3", **d}


PRESETS: dict[str, STDiT3Config] = {
    "opensora-v1.2": STDiT3Config(),  # STDiT3-XL/2, hpcai-tech/OpenSora-STDiT-v3
    "opensora-v1.2-3b": STDiT3Config(hidden_size=1872, num_heads=26),  # STDiT3-3B/2 (defined, not released)
}


# ----------------------------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (LlamaRMSNorm, as the release)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * h.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_()).to(x.dtype)
        # in place where the dtypes allow: one [.., D] tensor fewer (they are the q and k of every token)
        w = self.weight.to(h.device)  # a host that streams layers (ComfyUI's low-VRAM load) may leave it behind
        return h.mul_(w) if w.dtype == h.dtype else w * h


class Mlp(nn.Module):
    """fc1 -> GELU (tanh) -> fc2 (timm's Mlp names)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu(self.fc1, x))


class SinusoidMLP(nn.Module):
    """A scalar (timestep, fps) -> 256 sinusoids (cos first) -> Linear, SiLU, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(256, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # s: [B] -> [B, D]
        return self.mlp(timestep_embedding(s, 256, flip_sin_to_cos=True).to(dtype))


class SelfAttention(nn.Module):
    """Fused qkv with bias, qk RMSNorm, optional RoPE (temporal blocks)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)
        self.backend: str | None = None
        self.parallel = None  # spatial blocks: a vdit_core.parallel.SequenceParallel (x holds this rank's part of each frame)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        # x: [B', N, D] -> [B', N, D]; rope: rotations [N, Dh/2, 2] (cos, sin) or None
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if isinstance(self.q_norm, nn.Identity):  # q and k are still views of the fused projection
                q, k = q.clone(), k.clone()
            rotate_(q, rope)  # in place: fresh tensors
            rotate_(k, rope)
        if self.parallel is None:
            out = attention(q, k, v, backend=self.backend)
        else:
            out = self.parallel.attention(q, k, v, backend=self.backend)
        return self.proj(out.reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys and values from the projected text (padding masked)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_linear = Linear(dim, dim)
        self.kv_linear = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: KeyMask | torch.Tensor | None) -> torch.Tensor:
        # x: [B, N, D], text: [B, L, D], mask: the text's KeyMask (or [B, L] bool) -> [B, N, D]
        b, n, d = x.shape
        q = self.q_linear(x).view(b, n, self.heads, self.head_dim)
        k, v = self.kv_linear(text).view(b, text.shape[1], 2, self.heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, mask=mask, backend=self.backend).reshape(b, n, d))


def _select(x_mask: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, t: int) -> torch.Tensor:
    """``a`` on frames where ``x_mask`` [B, T] is True, ``b`` elsewhere (tensors [B, T*S, D])."""
    if x_mask is None:
        return a
    shape = a.shape
    keep = x_mask[:, :, None, None]
    return torch.where(keep, a.view(shape[0], t, -1, shape[-1]), b.view(shape[0], t, -1, shape[-1])).view(shape)


class STDiT3Block(nn.Module):
    """One spatial or temporal block: modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, cfg: STDiT3Config, temporal: bool):
        super().__init__()
        d = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, d))

    def _modulation(self, t_mod: torch.Tensor, t0_mod: torch.Tensor | None = None, x_mask: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) of attention, then of the MLP, each [B, T, 1, D] per frame: the
        conditioning frames' (``x_mask`` False) from t0_mod; [B, 1, 1, D] without a mask."""
        b = t_mod.shape[0]
        table = self.scale_shift_table.to(t_mod.device)[None]
        mod = (table + t_mod.reshape(b, 6, -1))[:, :, None]  # [B, 6, 1, D]
        if x_mask is not None:
            mod0 = (table + t0_mod.reshape(b, 6, -1))[:, :, None]
            mod = torch.where(x_mask[:, None, :, None], mod, mod0)  # [B, 6, T, D]
        return mod[:, :, :, None].unbind(1)

    def modulated_input(self, x: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        """norm1(x) * (1 + scale) + shift of the noisy frames' modulation (step caching's signal)."""
        shift, scale = (m[:, 0] for m in self._modulation(t_mod)[:2])
        return torch.addcmul(shift, self.norm1(x), 1 + scale)

    def forward(self, x, text, mask, t_mod, t0_mod, x_mask, t: int, s: int, rope):
        # x: [B, T*S, D]; t_mod / t0_mod: [B, 6D]; x_mask: [B, T] (True: noisy frame) or None
        b, n, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(t_mod, t0_mod, x_mask)

        def frames(v: torch.Tensor) -> torch.Tensor:  # [B, T*S, D] -> [B, T, S, D]: the modulation is per frame
            return v.view(b, t, s, d)

        # addcmul: norm(x) * (1 + scale) + shift, and x + gate * h, in one pass each
        h = torch.addcmul(shift_msa, frames(self.norm1(x)), 1 + scale_msa).view(b, n, d)
        if self.temporal:  # attend over frames: [B*S, T, D]
            h = frames(h).transpose(1, 2).reshape(b * s, t, d)
            h = self.attn(h, rope).view(b, s, t, d).transpose(1, 2).reshape(b, n, d)
        else:  # attend within each frame: [B*T, S, D]
            h = self.attn(h.view(b * t, s, d), None).view(b, n, d)
        x = torch.addcmul(frames(x), gate_msa, frames(h)).view(b, n, d)

        x = x + self.cross_attn(x, text, mask)

        h = torch.addcmul(shift_mlp, frames(self.norm2(x)), 1 + scale_mlp).view(b, n, d)
        return torch.addcmul(frames(x), gate_mlp, frames(self.mlp(h))).view(b, n, d)


class FinalLayer(nn.Module):
    """LayerNorm, shift/scale from t (no SiLU, PixArt's T2IFinalLayer), Linear to patches."""

    def __init__(self, cfg: STDiT3Config):
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.linear = Linear(d, math.prod(cfg.patch_size) * cfg.out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, d))

    def forward(self, x, t_emb, t0_emb, x_mask, t: int):
        # x: [B, N, D], t_emb: [B, D] -> [B, N, prod(patch) * C_out]
        table = self.scale_shift_table.to(t_emb.device)[None]
        shift, scale = (table + t_emb[:, None]).chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm_final(x), 1 + scale)
        if x_mask is not None:
            # the release normalises the already modulated tokens again for conditioning frames
            # (T2IFinalLayer reuses its variable); kept, as the weights were trained with it
            shift0, scale0 = (table + t0_emb[:, None]).chunk(2, dim=1)
            h = _select(x_mask, h, torch.addcmul(shift0, self.norm_final(h), 1 + scale0), t)
        return self.linear(h)


@lru_cache(maxsize=32)
def pos_embed_2d(dim: int, h: int, w: int, scale: float, base_size: int) -> torch.Tensor:
    """Open-Sora's 2D sin-cos table [h*w, dim] (float32): the first half encodes the column, the
    second the row, each as [sin, cos] of ``index / scale * base_size / side``."""
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    rows = torch.arange(h) / scale * (base_size / h)
    cols = torch.arange(w) / scale * (base_size / w)

    def sincos(p: torch.Tensor) -> torch.Tensor:
        a = torch.outer(p, inv_freq)
        return torch.cat([a.sin(), a.cos()], dim=-1)  # [n, half]

    return torch.cat([sincos(cols)[None].expand(h, w, half), sincos(rows)[:, None].expand(h, w, half)], dim=-1).reshape(h * w, dim)


class STDiT3(nn.Module):
    """The STDiT3 transformer.

    ``forward(x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
    drop_text=None)``: latents ``x`` [B, 4, T, h, w], float timesteps [B] in [0, 1000], T5 states
    ``y`` [B, L, 4096] with their ``mask`` [B, L] (None: every token). ``x_mask`` [B, T] bool: False
    marks conditioning frames (modulated with t = 0). ``fps`` [B] or a number, required: the frame
    rate it is conditioned on (which rate to ask for is the family's ``sample_conditioning``).
    ``height``/``width`` the pixel size (default 8x the latent's), which scales the positional
    table. ``drop_text`` [B] bool replaces ``y`` with the learned null embedding (the
    unconditional branch of CFG). Returns [B, 8, T, h, w] float32: the velocity ``x0 - noise`` in
    the first 4 channels.
    """

    # the Linears a LoRA adapts by default (a regex over module names): self-attention qkv/out,
    # cross-attention q/kv/out, MLP, in the spatial and the temporal blocks
    lora_targets = r"(spatial|temporal)_blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.fc[12])"

    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = SinusoidMLP(d)
        self.fps_embedder = SinusoidMLP(d)
        self.t_block = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = Mlp(cfg.caption_channels, d, d)
        self.y_embedder.register_buffer("y_embedding", torch.zeros(cfg.model_max_length, cfg.caption_channels))
        self.rope = nn.Module()  # rotary-embedding-torch's frequencies, saved with the release
        self.rope.register_buffer("freqs", rope_freqs(cfg.head_dim))
        self.spatial_blocks = nn.ModuleList([STDiT3Block(cfg, temporal=False) for _ in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(cfg, temporal=True) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False
        self.step_cache: StepCache | None = None  # set for a sampling run (vdit_core.step_cache)
        self.parallel = None  # a vdit_core.parallel.SequenceParallel splitting each frame's tokens, or None

    def set_attention_backend(self, backend: str | None) -> None:
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            block.attn.backend = block.cross_attn.backend = backend

    def set_sequence_parallel(self, sp) -> None:
        """Split each frame's tokens over ``sp``'s ranks (None: one process). Temporal attention
        (over the frames of one position) and cross-attention need no exchange; spatial
        attention exchanges through ``sp``."""
        if sp is not None:
            sp.check_heads(self.config.num_heads)
        self.parallel = sp
        for block in self.spatial_blocks:
            block.attn.parallel = sp

    def _rope(self, t: int, device) -> torch.Tensor:
        # interleaved pairs rotated by position * freqs (rotary-embedding-torch's layout): (cos, sin) [t, Dh/2, 2]
        angles = torch.outer(torch.arange(t, device=device, dtype=torch.float32), self.rope.freqs.to(device, torch.float32))
        return torch.stack((angles.cos(), angles.sin()), dim=-1)

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, drop_text=None):
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        b, _, tx, hx, wx = x.shape
        pt, ph, pw = cfg.patch_size
        # pad to whole patches (cropped again at the end), as the release
        x = F.pad(x.to(dtype), (0, -wx % pw, 0, -hx % ph, 0, -tx % pt))
        t, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        s = h * w
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b).to(dtype)
        if fps is None:
            raise ValueError("fps: STDiT3 is conditioned on a frame rate; pass it (the Open-Sora family's sample_conditioning gives the release's)")
        fps = torch.as_tensor(fps, device=x.device, dtype=torch.float32).reshape(-1).expand(b)

        # positions scaled by the pixel resolution (the first sample's, as the release)
        height = float(torch.as_tensor(height).reshape(-1)[0]) if height is not None else hx * 8
        width = float(torch.as_tensor(width).reshape(-1)[0]) if width is not None else wx * 8
        pos = pos_embed_2d(cfg.hidden_size, h, w, math.sqrt(height * width) / cfg.input_sq_size, round(s**0.5)).to(x.device, dtype)

        fps_emb = self.fps_embedder(fps, dtype)
        t_emb = self.t_embedder(timestep, dtype) + fps_emb  # [B, D]
        t_mod = self.t_block(t_emb)  # [B, 6D]
        t0_emb = t0_mod = None
        if x_mask is not None:
            x_mask = x_mask.to(x.device).bool()
            t0_emb = self.t_embedder(torch.zeros_like(timestep), dtype) + fps_emb
            t0_mod = self.t_block(t0_emb)

        y = y.to(x.device, dtype)
        if y.ndim == 4:  # the official [B, 1, L, C]
            y = y[:, 0]
        if drop_text is not None:
            null = self.y_embedder.y_embedding[: y.shape[1]].to(x.device, dtype)
            y = torch.where(drop_text.to(x.device).bool()[:, None, None], null[None], y)
        text_keys = None
        if mask is not None:
            text_mask = mask.to(x.device).bool()
            keep = text_mask.any(dim=0)  # tokens masked in every sample cannot matter: skip them (the release packs valid tokens)
            if not bool(keep.all()):
                y, text_mask = y[:, keep], text_mask[:, keep]
            # the mask in the attention backends' forms, made once here: no block reads its values
            text_keys = key_mask(None, text_mask, text_mask.shape[1], x.device)
        text = self.y_embedder.y_proj(y)  # [B, L, D]

        tokens = patch_tokens(self.x_embedder.proj(x))  # [B, T*S, D]
        tokens = (tokens.view(b, t, s, -1) + pos[None, None]).view(b, t * s, -1)
        rope = self._rope(t, x.device)
        sp = self.parallel
        if sp is not None:  # this rank's part of every frame: [B, T*S/W, D]
            tokens = sp.split(tokens.view(b, t, s, -1), 2).flatten(1, 2)
            s = tokens.shape[1] // t

        def blocks(tokens: torch.Tensor) -> torch.Tensor:
            for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
                for block in (spatial, temporal):
                    args = (tokens, text, text_keys, t_mod, t0_mod, x_mask, t, s, rope)
                    if self.gradient_checkpointing and torch.is_grad_enabled():
                        tokens = checkpoint(block, *args, use_reentrant=False)
                    else:
                        tokens = block(*args)
            return tokens

        def signal() -> torch.Tensor:  # the first block's modulated input (every rank's, so all decide alike)
            with on_device(self.spatial_blocks[0]):  # block swap may stream it
                first = self.spatial_blocks[0].modulated_input(tokens, t_mod)
            return first if sp is None else sp.gather(first.view(b, t, s, -1), 2)

        # with a step cache, the signal tells how much this step's input changed
        tokens = run_blocks(self.step_cache, tokens, blocks, signal, text)

        out = self.final_layer(tokens, t_emb, t0_emb, x_mask, t)  # [B, N, pt*ph*pw*C]
        if sp is not None:
            out = sp.gather(out.view(b, t, s, -1), 2)
        co = cfg.out_channels
        out = out.reshape(b, t, h, w, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, co, t * pt, h * ph, w * pw)
        return out[:, :, :tx, :hx, :wx].float()


# ----------------------------------------------------------------------------------------------
# checkpoints


def is_state_dict(keys) -> bool:
    """An STDiT3 transformer (temporal blocks and an fps embedder), wrapped or not."""
    ks = unwrapped_keys(keys)
    return "temporal_blocks.0.attn.qkv.weight" in ks and "fps_embedder.mlp.0.weight" in ks


def infer_config(sd: dict[str, torch.Tensor]) -> STDiT3Config:
    """A config read off the weights (every field they determine; the rest are the release's)."""
    try:
        proj = sd["x_embedder.proj.weight"]  # [D, C, pt, ph, pw]
        head_dim = sd["spatial_blocks.0.attn.q_norm.weight"].shape[0] if "spatial_blocks.0.attn.q_norm.weight" in sd else None
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("spatial_blocks."))
        mlp = sd["spatial_blocks.0.mlp.fc1.weight"].shape[0]
        null = sd["y_embedder.y_embedding"]
        out = sd["final_layer.linear.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a whole STDiT3 transformer (missing {e})") from None
    d = proj.shape[0]
    patch = tuple(proj.shape[2:])
    if head_dim is None:  # no qk norm: heads as the release (72 wide)
        head_dim = 72 if d % 72 == 0 else d // 16
    return STDiT3Config(
        hidden_size=d, depth=depth, num_heads=d // head_dim, mlp_ratio=mlp / d, in_channels=proj.shape[1], patch_size=patch,
        pred_sigma=out // math.prod(patch) == 2 * proj.shape[1], caption_channels=null.shape[1], model_max_length=null.shape[0],
        qk_norm="spatial_blocks.0.attn.q_norm.weight" in sd,
    )


def preset_name(cfg: STDiT3Config) -> str | None:
    for name, preset in PRESETS.items():
        if dataclasses.replace(preset, input_sq_size=cfg.input_sq_size, class_dropout_prob=cfg.class_dropout_prob) == cfg:
            return name
    return None


def rope_freqs(head_dim: int) -> torch.Tensor:
    """rotary-embedding-torch's frequencies (theta 10000) for ``head_dim`` channels."""
    return 1.0 / 10000 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)


def load_transformer(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: STDiT3Config | None = None) -> STDiT3:
    """An STDiT3 transformer from the released folder (``config.json`` + ``model.safetensors``),
    a single safetensors file, or a training checkpoint (``.pt`` read with ``weights_only=True``;
    ``module.`` / ``ema.`` prefixes stripped)."""
    from pathlib import Path

    from ..checkpoint import CheckpointError, load_model, load_state_dict, read_json

    path = Path(path)
    sd = load_state_dict(path, dtype=dtype, device=device)
    if not is_state_dict(sd.keys()):
        from ..checkpoint import describe

        raise CheckpointError(f"{path}: expected an Open-Sora STDiT3 transformer, but this looks like {describe(sd.keys())}")
    if config is None and path.is_dir() and (path / "config.json").exists():
        config = STDiT3Config.from_json(read_json(path / "config.json"))
    sd = unwrap_prefixes(sd)
    try:
        head_dim = (config or infer_config(sd)).head_dim
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    # released files hold rope.freqs (a float32 parameter of rotary-embedding-torch); kept in
    # float32 whatever the weight dtype, and computed for files without it
    sd["rope.freqs"] = sd["rope.freqs"].float() if "rope.freqs" in sd else rope_freqs(head_dim).to(device)
    return load_model(
        path, state_dict=sd, build=STDiT3, expected="an Open-Sora STDiT3 transformer", recognise=is_state_dict,
        from_json=STDiT3Config.from_json, infer_config=infer_config, dtype=dtype, device=device, config=config,
        label=lambda c: f"an Open-Sora STDiT3 transformer ({preset_name(c) or 'custom config'})",
    )


def save_transformer(model: STDiT3, folder, dtype: torch.dtype | None = None, state_dict: dict | None = None) -> None:
    """``config.json`` + ``model.safetensors``: the released layout, switched in whole over an
    earlier save."""
    from ..checkpoint import save_diffusers_folder

    save_diffusers_folder(folder, model.config.to_json(), state_dict if state_dict is not None else model.state_dict(), dtype,
                          weights_name="model")


__all__ = ["STDiT3", "STDiT3Config", "PRESETS", "load_transformer", "save_transformer", "is_state_dict"]
