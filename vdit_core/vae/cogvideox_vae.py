"""CogVideoX's 3D causal VAE: 8x spatial and 4x temporal compression, 16 latent channels.

Encoding and decoding run chunk by chunk along time (8 pixel frames / 2 latent frames per chunk,
as the release does), each causal convolution handing its cache to the next chunk explicitly,
so memory stays flat as videos get longer. Optional spatial tiling with blended overlaps bounds
memory for large frames too. Parameter names are those of the official diffusers checkpoints;
SAT checkpoints are converted in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import known_fields
from . import causal_conv
from .causal_conv import CausalConv3d, pointwise
from .common import Tiling, VideoVAE

Cache = dict


@dataclass(frozen=True)
class CogVideoXVAEConfig:
    """Architecture of a CogVideoX VAE (names as in diffusers' ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426  # 2B; 0.7 for the 5B family
    invert_scale_latents: bool = False  # 1.5: image-to-video conditions on latents / scaling_factor
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    sample_height: int = 480  # default tile size is half of this
    sample_width: int = 720

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "CogVideoXVAEConfig":
        return cls(**known_fields(cls, config))

    def to_diffusers(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(d["block_out_channels"])
        n = len(self.block_out_channels)
        d["down_block_types"] = ["CogVideoXDownBlock3D"] * n
        d["up_block_types"] = ["CogVideoXUpBlock3D"] * n
        return {"_class_name": "AutoencoderKLCogVideoX", **d}


PRESETS: dict[str, CogVideoXVAEConfig] = {
    "cogvideox-2b": CogVideoXVAEConfig(),
    "cogvideox-5b": CogVideoXVAEConfig(scaling_factor=0.7),
    "cogvideox1.5-5b": CogVideoXVAEConfig(scaling_factor=0.7, invert_scale_latents=True),
}


# ----------------------------------------------------------------------------------------------
# blocks


class SpatialNorm3D(nn.Module):
    """GroupNorm whose scale and shift come from the latents (decoder; Zhu et al. 2022)."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, first: bool = True) -> torch.Tensor:
        # f: [B, C, T, H, W]; zq: the chunk's latents [B, Cz, t, h, w]. Nearest-neighbour resizing
        # commutes with the 1x1x1 convolutions, so they run at the latents' size and only their
        # outputs are resized (without autograd: broadcast, never materialised at full size).
        y, b = self.conv_y(zq)[0], self.conv_b(zq)[0]  # [B, C, t, h, w]
        # in a video's first chunk the first frame stands alone (causal VAE): it is resized separately
        parts = [(slice(0, 1), slice(0, 1)), (slice(1, None), slice(1, None))] if first and f.shape[2] > 1 else [(slice(None), slice(None))]
        n = self.norm_layer(f)
        if torch.is_grad_enabled() or not all(_divides(y[:, :, zs], n[:, :, fs]) for fs, zs in parts):
            y = torch.cat([F.interpolate(y[:, :, zs], size=n[:, :, fs].shape[-3:]) for fs, zs in parts], dim=2)
            b = torch.cat([F.interpolate(b[:, :, zs], size=n[:, :, fs].shape[-3:]) for fs, zs in parts], dim=2)
            return n * y + b
        for fs, zs in parts:
            seg, ys, bs = n[:, :, fs], y[:, :, zs], b[:, :, zs]
            (B, C, t, h, w), (T, H, W) = ys.shape, seg.shape[-3:]
            view = seg.view(B, C, t, T // t, h, H // h, w, W // w)
            view.mul_(ys[:, :, :, None, :, None, :, None]).add_(bs[:, :, :, None, :, None, :, None])
        return n


def _divides(small: torch.Tensor, big: torch.Tensor) -> bool:
    """Whether each of the last three sizes of ``small`` divides ``big``'s (nearest resizing is then
    a repeat)."""
    return all(b % s == 0 for s, b in zip(small.shape[-3:], big.shape[-3:]))


class ResnetBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, groups)
            self.norm2 = SpatialNorm3D(cout, zq_channels, groups)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.conv2 = CausalConv3d(cout, cout, 3)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None
        self.spatial = zq_channels is not None

    def _norm(self, norm, x, zq, first):
        return norm(x, zq, first) if self.spatial else norm(x)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: Cache, first: bool = True) -> tuple[torch.Tensor, Cache]:
        new = {}
        # the norms' outputs are fresh: activate them in place when autograd keeps nothing, and pass
        # them on unnamed, so each convolution's input is freed as soon as it is padded
        inplace = not torch.is_grad_enabled()
        h, new["conv1"] = self.conv1(F.silu(self._norm(self.norm1, x, zq, first), inplace=inplace), cache.get("conv1"))
        h, new["conv2"] = self.conv2(F.silu(self._norm(self.norm2, h, zq, first), inplace=inplace), cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = pointwise(self.conv_shortcut, x)
        return (h.add_(x) if inplace else x + h), new


class Downsample(nn.Module):
    """Halve H and W (strided conv); with ``compress_time`` also halve time, keeping the first
    frame of an odd-length chunk on its own."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.compress_time and t > 1:
            first, rest = (x[:, :, :1], x[:, :, 1:]) if t % 2 else (x[:, :, :0], x)
            rest = rest.reshape(b, c, rest.shape[2] // 2, 2, h, w).mean(3)
            x = torch.cat([first, rest], dim=2)
        t = x.shape[2]
        x = F.pad(x.transpose(1, 2).reshape(b * t, c, h, w), (0, 1, 0, 1))
        x = self.conv(x)
        return x.reshape(b, t, c, x.shape[-2], x.shape[-1]).transpose(1, 2)


class Upsample(nn.Module):
    """Double H and W (nearest + conv); with ``compress_time`` also double time, except the first
    frame of a video's first chunk.

    The reference decides "first chunk" from an odd chunk length, which agrees for the odd latent
    counts of 8N+1-frame videos; an even count (13 frames -> 4 latents) then decoded to 4T
    frames. The explicit flag gives 4(T-1)+1 frames for every 4k+1-frame video."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor, first: bool = True) -> torch.Tensor:
        # x: [B, C, T, h, w] -> [B, C, T', 2h, 2w]. Nearest-neighbour upsampling then the 3x3
        # convolution per frame, over slices of output frames written into the output: neither the
        # whole upsampled video nor the convolution's buffers for all of it are ever held. The
        # output is contiguous in [B, C, T, H, W]: the next GroupNorm and 1x1x1 convolution would
        # copy a frame-major one
        b, c, t, h, w = x.shape
        keep = 1 if self.compress_time and first else 0  # frames upsampled in space only
        r = 2 if self.compress_time else 1
        t_out = keep + r * (t - keep)
        src = [j if j < keep else keep + (j - keep) // r for j in range(t_out)]  # the input frame of each output frame
        step = max(1, causal_conv.SLICE_ELEMENTS // (b * c * 4 * h * w))
        out = x.new_empty(b, c, t_out, 2 * h, 2 * w) if step < t_out else None
        for s in range(0, t_out, step):
            e = min(t_out, s + step)
            frames = x.index_select(2, torch.tensor(src[s:e], device=x.device)).transpose(1, 2).reshape(b * (e - s), c, h, w)
            y = self.conv(F.interpolate(frames, size=(2 * h, 2 * w), mode="nearest"))  # [B*n, C, 2h, 2w]
            y = y.view(b, e - s, c, 2 * h, 2 * w).transpose(1, 2)
            if out is None:
                return y.contiguous()
            out[:, :, s:e] = y
            del y
        return out


class _Stage(nn.Module):
    """Resnets then an optional resampler (``downsamplers.0`` / ``upsamplers.0``); run by
    :func:`_run_stages`."""

    def __init__(self, resnets: list[ResnetBlock3D], sampler: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, kind, nn.ModuleList([sampler]))
        self.kind = kind if sampler is not None else None


def _run_stages(stages: list[tuple[str, _Stage]], x: torch.Tensor, zq: torch.Tensor | None, cache: Cache,
                first: bool = True) -> tuple[torch.Tensor, Cache]:
    """Every resnet and resampler of ``stages`` (cache key, stage) in one flat loop, not a call per
    stage, so that no stage's input stays referenced while its later resnets run (at full
    resolution that is 100+ MB). Returns the output and the stages' new caches."""
    new = {}
    for key, stage in stages:
        old, new[key] = cache.get(key, {}), {}
        for i, r in enumerate(stage.resnets):
            x, new[key][f"resnet_{i}"] = r(x, zq, old.get(f"resnet_{i}", {}), first)
        if stage.kind == "upsamplers":
            x = stage.upsamplers[0](x, first)
        elif stage.kind is not None:
            x = getattr(stage, stage.kind)[0](x)
    return x, new


class Encoder(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        n_time = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock3D(prev if j == 0 else c, c, g, eps) for j in range(cfg.layers_per_block)]
            down = Downsample(c, compress_time=i < n_time) if i < len(ch) - 1 else None
            blocks.append(_Stage(resnets, down, "downsamplers"))
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _Stage([ResnetBlock3D(ch[-1], ch[-1], g, eps) for _ in range(2)], None, "")
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        # x: [B, 3, T, H, W] -> moments [B, 2C, T', H/8, W/8]
        new = {}
        x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        x, stages = _run_stages([(f"down_{i}", blk) for i, blk in enumerate(self.down_blocks)] + [("mid", self.mid_block)], x, None, cache)
        new.update(stages)
        x = F.silu(self.norm_out(x))
        x, new["conv_out"] = self.conv_out(x, cache.get("conv_out"))
        return x, new


class Decoder(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        ch, g, eps, zc = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels
        n_time = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, ch[0], 3)
        self.mid_block = _Stage([ResnetBlock3D(ch[0], ch[0], g, eps, zc) for _ in range(2)], None, "")
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock3D(prev if j == 0 else c, c, g, eps, zc) for j in range(cfg.layers_per_block + 1)]
            up = Upsample(c, compress_time=i < n_time) if i < len(ch) - 1 else None
            blocks.append(_Stage(resnets, up, "upsamplers"))
            prev = c
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = SpatialNorm3D(ch[-1], zc, g)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: Cache, first: bool = True) -> tuple[torch.Tensor, Cache]:
        # z: [B, C, T', h, w] -> [B, 3, T, 8h, 8w]; ``first``: this chunk starts the video
        new = {}
        x, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        x, stages = _run_stages([("mid", self.mid_block)] + [(f"up_{i}", blk) for i, blk in enumerate(self.up_blocks)], x, z, cache, first)
        new.update(stages)
        x = F.silu(self.norm_out(x, z, first))
        x, new["conv_out"] = self.conv_out(x, cache.get("conv_out"))
        return x, new


# ----------------------------------------------------------------------------------------------
# the autoencoder


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """Time chunks as the release makes them: ``size`` frames each, the remainder (the causal
    first frame, plus any excess) joined to the first chunk."""
    k = max(n // size, 1)
    rem = n - k * size if n >= size else 0
    edges = [0] + [size * (i + 1) + rem for i in range(k)]
    edges[-1] = n
    return list(zip(edges[:-1], edges[1:]))


class CogVideoXVAE(VideoVAE):
    """CogVideoX's causal video VAE.

    ``encode(video) -> latents`` takes pixels in [-1, 1], [B, 3, F, H, W] (F = 4k+1 or 1), and
    returns scaled latents [B, 16, (F-1)/4+1, H/8, W/8]; ``decode(latents)`` inverts it.
    """

    def __init__(self, config: CogVideoXVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv3d(c, c, 1) if config.use_post_quant_conv else None

    def info(self) -> dict:
        return {"scaling_factor": self.config.scaling_factor, "invert_scale_latents": self.config.invert_scale_latents}

    def default_tiling(self) -> Tiling:
        return Tiling(self.config.sample_height // 2, self.config.sample_width // 2)

    # -- encoding ----------------------------------------------------------------------------
    def _encode_chunked(self, x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        cache: Cache = {}
        out = []
        for a, b in _chunks(x.shape[2], chunk_frames):
            m, cache = self.encoder(x[:, :, a:b].to(self.dtype), cache)
            if self.quant_conv is not None:
                m = self.quant_conv(m)
            out.append(m)
        return torch.cat(out, dim=2)

    # -- decoding ----------------------------------------------------------------------------
    def _decode_chunked(self, z: torch.Tensor, chunk_frames: int, output_device, on_chunk=None) -> torch.Tensor:
        cache: Cache = {}
        out, done = None, 0
        for a, b in _chunks(z.shape[2], chunk_frames):
            zz = z[:, :, a:b].to(self.dtype)
            if self.post_quant_conv is not None:
                zz = self.post_quant_conv(zz)
            x, cache = self.decoder(zz, cache, first=a == 0)
            del zz
            if out is None:  # the whole video's frames, allocated once the first chunk shows their size
                n = x.shape[2] + (z.shape[2] - b) * self.config.temporal_compression_ratio
                out = x.new_empty(*x.shape[:2], n, *x.shape[3:], device=output_device or x.device)
            out[:, :, done : done + x.shape[2]] = x
            done += x.shape[2]
            del x
            if on_chunk is not None:
                on_chunk((b - a) * z.shape[0])
        return out[:, :, :done]


# ----------------------------------------------------------------------------------------------
# checkpoints


def is_diffusers_state_dict(keys) -> bool:
    # the decoder's SpatialNorm (conv_y) tells it from 2D image VAEs of the same layout
    return any(k.startswith("decoder.up_blocks.") and "conv_y" in k for k in keys)


def is_sat_state_dict(keys) -> bool:
    return any(k.startswith("decoder.up.") and "conv_y" in k for k in keys)


def convert_sat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SAT VAE weights (``3d-vae.pt``) -> diffusers names."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
    out = {}
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        k = key
        m = re.match(r"decoder\.up\.(\d+)\.", k)
        if m:  # SAT numbers decoder stages from the bottom
            k = f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}." + k[m.end():]
        k = k.replace("encoder.down.", "encoder.down_blocks.")
        k = k.replace(".block.", ".resnets.").replace(".downsample.", ".downsamplers.0.").replace(".upsample.", ".upsamplers.0.")
        k = k.replace(".nin_shortcut.", ".conv_shortcut.")
        k = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.", lambda m_: f"{m_.group(1)}.mid_block.resnets.{int(m_.group(2)) - 1}.", k)
        out[k] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], base: CogVideoXVAEConfig | None = None) -> CogVideoXVAEConfig:
    """Config read off diffusers-named VAE weights; the scaling factor comes from ``base``."""
    for part in ("encoder.down_blocks.", "decoder.up_blocks."):
        if not any(k.startswith(part) for k in sd):
            raise ValueError(f"an incomplete CogVideoX VAE: it has no {part}* weights")
    try:
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        chans = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in range(n))
        layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        latent = sd["decoder.conv_in.conv.weight"].shape[1]
        cin = sd["encoder.conv_in.conv.weight"].shape[1]
        cout = sd["decoder.conv_out.conv.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a CogVideoX VAE state dict ({e})") from None
    base = base or PRESETS["cogvideox-5b"]
    groups = base.norm_num_groups
    if any(c % groups for c in chans):
        groups = math.gcd(*chans)
    return dataclasses.replace(
        base,
        in_channels=cin,
        out_channels=cout,
        block_out_channels=chans,
        latent_channels=latent,
        layers_per_block=layers,
        norm_num_groups=groups,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
    )


def load_vae(
    path,
    dtype: torch.dtype | None = torch.float32,
    device="cpu",
    config: CogVideoXVAEConfig | None = None,
    base: CogVideoXVAEConfig | None = None,
) -> CogVideoXVAE:
    """A CogVideoX VAE from a diffusers folder, a single safetensors file (diffusers names) or
    the official SAT ``3d-vae.pt``. Without a config.json the architecture is read off the
    weights and the scaling factor comes from ``base`` (default: the 5B family's 0.7; the 2B
    VAE's is 1.15258426, ``PRESETS["cogvideox-2b"]``)."""
    from ..checkpoint import load_model

    return load_model(
        path, build=CogVideoXVAE, expected="a CogVideoX VAE", recognise=is_diffusers_state_dict,
        from_json=CogVideoXVAEConfig.from_diffusers, infer_config=lambda sd: infer_config(sd, base), dtype=dtype,
        device=device, config=config, convert=(is_sat_state_dict, convert_sat),
    )
