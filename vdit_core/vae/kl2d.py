"""The 2D KL autoencoder of the Stable Diffusion family (SDXL's: 4 channels, 8x), as a video VAE
that codes each frame on its own: HunyuanDiT's VAE, and Open-Sora 1.2's spatial stage.

Parameter names are those of diffusers' ``AutoencoderKL`` checkpoints. Frames are folded into the
batch ``chunk_frames`` at a time, so memory is bounded by one micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from ..checkpoint import known_fields
from .common import Tiling, VideoVAE


@dataclass(frozen=True)
class KL2DConfig:
    """Architecture of a 2D KL VAE (names as in diffusers' ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025  # SDXL's VAE
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 1024  # default tile is half of this

    temporal_compression_ratio = 1  # frames are coded one by one

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "KL2DConfig":
        kw = known_fields(cls, config)
        if isinstance(kw.get("sample_size"), tuple):
            kw["sample_size"] = int(kw["sample_size"][0])
        return cls(**kw)


PRESETS = {"sdxl": KL2DConfig(), "sd": KL2DConfig(scaling_factor=0.18215)}


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # the norms' outputs are fresh tensors: activate them in place when nothing is saved
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """One-head attention over the pixels of the mid block."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t)[:, :, None] for proj in (self.to_q, self.to_k, self.to_v))  # [B, HW, 1, C]
        out = self.to_out[0](attention(q, k, v)[:, :, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Down(nn.Module):
    """Halve H and W: pad right and bottom by one, strided 3x3 conv (as the SD VAE)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    def __init__(self, resnets: list[nn.Module], sampler: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, kind, nn.ModuleList([sampler]))
        self.kind = kind if sampler is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return getattr(self, self.kind)[0](x) if self.kind else x


class Encoder(nn.Module):
    def __init__(self, cfg: KL2DConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock(prev if j == 0 else c, c, g) for j in range(cfg.layers_per_block)]
            blocks.append(Stage(resnets, Down(c) if i < len(ch) - 1 else None, "downsamplers"))
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = Mid(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 3, H, W] -> moments [N, 2C, H/8, W/8]; channels-last throughout (oneDNN's and
        # cuDNN's fast layout; diffusers' VAE ends up in it after its attention reshape)
        x = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: KL2DConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = Mid(ch[0], g)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock(prev if j == 0 else c, c, g) for j in range(cfg.layers_per_block + 1)]
            blocks.append(Stage(resnets, Up(c) if i < len(ch) - 1 else None, "upsamplers"))
            prev = c
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [N, C, h, w] -> [N, 3, 8h, 8w]; channels-last throughout (as the encoder)
        x = self.mid_block(self.conv_in(z.contiguous(memory_format=torch.channels_last)))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class KL2DVAE(VideoVAE):
    """The SD-family image VAE applied frame by frame: ``encode`` [B, 3, F, H, W] in [-1, 1] ->
    scaled latents [B, C, F, H/8, W/8]; ``decode`` inverts it."""

    def __init__(self, config: KL2DConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def info(self) -> dict:
        return {"scaling_factor": self.config.scaling_factor}

    def default_tiling(self) -> Tiling:
        half = self.config.sample_size // 2
        return Tiling(half, half, 0.25, 0.25)

    def _frames(self, x: torch.Tensor, chunk_frames: int, fn, output_device=None, on_chunk=None) -> torch.Tensor:
        """``fn`` over the frames of [B, C, F, H, W], ``chunk_frames`` frames at a time
        (``on_chunk(n)`` after each, with its n frames)."""
        b, c, f = x.shape[:3]
        flat = x.transpose(1, 2).reshape(b * f, c, *x.shape[3:])
        parts = []
        for i in range(0, b * f, max(1, chunk_frames)):
            y = fn(flat[i : i + chunk_frames].to(self.dtype))
            parts.append(y.to(output_device) if output_device is not None else y)
            if on_chunk is not None:
                on_chunk(y.shape[0])
        y = torch.cat(parts)
        return y.reshape(b, f, *y.shape[1:]).transpose(1, 2)

    def _encode_chunked(self, video: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        def enc(x):
            m = self.encoder(x)
            return self.quant_conv(m) if self.quant_conv is not None else m

        return self._frames(video, chunk_frames, enc)

    def _decode_chunked(self, z: torch.Tensor, chunk_frames: int, output_device, on_chunk=None) -> torch.Tensor:
        def dec(x):
            return self.decoder(self.post_quant_conv(x) if self.post_quant_conv is not None else x)

        return self._frames(z, chunk_frames, dec, output_device, on_chunk)


# ----------------------------------------------------------------------------------------------
# checkpoints


def is_diffusers_state_dict(keys) -> bool:
    """An SD-family VAE in diffusers' layout (no CogVideoX SpatialNorm, no time convolutions)."""
    return any(k.startswith("decoder.up_blocks.") for k in keys) and "decoder.conv_in.weight" in keys and not any("conv_y" in k for k in keys)


def is_ldm_state_dict(keys) -> bool:
    """The same VAE in the original (LDM / ComfyUI) names: ``encoder.down.0.block.0``, ``mid.attn_1``."""
    return any(k.startswith("decoder.up.") for k in keys) and "decoder.conv_in.weight" in keys and not any("conv_y" in k for k in keys)


def convert_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-named SD VAE weights -> diffusers names (decoder stages numbered from the bottom there;
    the mid-block attention's 1x1 convolutions become linear layers)."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for key, value in sd.items():
        k = key
        m = re.match(r"decoder\.up\.(\d+)\.", k)
        if m:
            k = f"decoder.up_blocks.{n_up - 1 - int(m[1])}." + k[m.end():]
        k = k.replace("encoder.down.", "encoder.down_blocks.").replace(".block.", ".resnets.")
        k = k.replace(".downsample.", ".downsamplers.0.").replace(".upsample.", ".upsamplers.0.").replace(".nin_shortcut.", ".conv_shortcut.")
        k = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.", lambda m_: f"{m_[1]}.mid_block.resnets.{int(m_[2]) - 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
        if m:
            k = f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
        out[k] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], base: KL2DConfig | None = None) -> KL2DConfig:
    """Architecture read off the weights; the scaling factor (and groups) come from ``base`` (SDXL's)."""
    try:
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        chans = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n))
        layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        latent = sd["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a whole 2D VAE (missing {e})") from None
    base = base or PRESETS["sdxl"]
    groups = base.norm_num_groups if not any(c % base.norm_num_groups for c in chans) else math.gcd(*chans)  # (tiny test VAEs)
    return dataclasses.replace(base, norm_num_groups=groups, in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                               block_out_channels=chans, layers_per_block=layers, latent_channels=latent,
                               use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def load_vae(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: KL2DConfig | None = None,
             base: KL2DConfig | None = None) -> KL2DVAE:
    """A 2D KL VAE from a diffusers folder, a single safetensors file (diffusers or LDM names), or
    the ``vae.`` / ``first_stage_model.`` part of a combined checkpoint; the scaling factor comes
    from the folder's config.json, else from ``base`` (SDXL's 0.13025)."""
    from ..checkpoint import load_model, read_part

    return load_model(
        path, state_dict=read_part(path, ("vae.", "first_stage_model."), dtype, device), build=KL2DVAE, expected="a 2D image VAE",
        recognise=is_diffusers_state_dict, from_json=KL2DConfig.from_diffusers, infer_config=lambda sd: infer_config(sd, base),
        dtype=dtype, device=device, config=config, convert=(is_ldm_state_dict, convert_ldm),
    )
