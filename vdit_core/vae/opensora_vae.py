"""Open-Sora 1.2's video VAE (``OpenSoraVAE_V1_2``): a 2D SDXL-style VAE per frame, then a
temporal VAE that compresses time 4x.

* Spatial stage: :class:`~vdit_core.vae.kl2d.KL2DVAE` on each frame (in micro-batches), latents
  scaled by 0.18215 (SD 1.x's factor, as the release, not SDXL's).
* Temporal stage (MAGVIT-v2 style, ``VAE_Temporal``): causal 3D convolutions whose time padding
  is zeros in front, GroupNorm-SiLU residual blocks without biases, two stride-2 time
  downsamplings, depth-to-space upsampling in the decoder, 1x1x1 quant convolutions.
* Video is coded in micro chunks of 17 frames (5 latent frames), each on its own: a chunk's
  causal context is the zero padding, so the temporal cache each chunk gets is empty by design
  and decoding a long video holds one chunk at a time: memory stays flat as frames grow.
* Latents are normalised per channel: ``(z - shift) / scale``.

Frame counts: each 17-frame chunk gives 5 latent frames; a last partial chunk of ``r`` frames
gives ``ceil(r / 4)``. Latents decode back to ``17k + (4m - 3)`` frames, so those are the counts
this VAE round-trips (1, 5, 9, 13, 17, 18, 22, ..., 34, 51, 102, ...).

Parameter names are those of the released ``hpcai-tech/OpenSora-VAE-v1.2`` ``model.safetensors``
(``spatial_vae.module.<diffusers AutoencoderKL names>``, ``temporal_vae.encoder.conv_in.conv``...,
``scale``, ``shift``), which holds both stages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import unwrap_prefixes, unwrapped_keys
from . import kl2d
from .common import Tiling, VideoVAE, frames_bytes

SPATIAL_SCALE = 0.18215  # the release scales the SDXL VAE's latents by SD 1.x's factor


@dataclass(frozen=True)
class TemporalVAEConfig:
    """The temporal VAE's architecture (the official ``VAE_Temporal`` arguments)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    @property
    def time_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)


TEMPORAL_PRESETS = {"VAE_Temporal_SD": TemporalVAEConfig()}


@dataclass(frozen=True)
class OpenSoraVAEConfig:
    """Both stages and the chunking / normalisation of an Open-Sora 1.2 VAE."""

    spatial: kl2d.KL2DConfig = kl2d.KL2DConfig(scaling_factor=SPATIAL_SCALE)
    temporal: TemporalVAEConfig = TemporalVAEConfig()
    micro_frame_size: int = 17
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    # the VideoVAE protocol's facts
    in_channels = 3
    scaling_factor = 1.0  # normalisation is the per-channel shift / scale above

    @property
    def latent_channels(self) -> int:
        return self.temporal.embed_dim

    @property
    def spatial_compression(self) -> int:
        return self.spatial.spatial_compression

    @property
    def temporal_compression_ratio(self) -> int:
        return self.temporal.time_compression

    @property
    def micro_latent_size(self) -> int:
        return -(-self.micro_frame_size // self.temporal.time_compression)


# ----------------------------------------------------------------------------------------------
# the temporal VAE


class CausalConv3d(nn.Module):
    """Conv3d causal in time: ``(k_t - 1) + 1 - stride`` zero frames in front; spatial padding
    keeps the size. The context before a chunk is zeros (the release codes chunks on their own)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int], stride: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.time_pad = kt - stride
        self.conv = nn.Conv3d(cin, cout, (kt, kh, kw), stride=(stride, 1, 1), padding=(0, kh // 2, kw // 2), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C_out, ceil(T / stride), H, W]
        return self.conv(F.pad(x, (0, 0, 0, 0, self.time_pad, 0)) if self.time_pad else x)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3x3 conv (no bias), twice; a 1x1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # the norms' outputs are fresh tensors
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        self.conv_in = CausalConv3d(cfg.in_out_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = f
        for i, mult in enumerate(cfg.channel_multipliers):
            width = f * mult
            self.block_res_blocks.append(nn.ModuleList([ResBlock(prev if j == 0 else width, width, g) for j in range(n)]))
            prev = width
            if i < len(cfg.channel_multipliers) - 1:
                self.conv_blocks.append(CausalConv3d(prev, width, 3, stride=2) if cfg.temporal_downsample[i] else nn.Identity())
        self.res_blocks = nn.ModuleList([ResBlock(prev, prev, g) for _ in range(n)])
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 4, T, h, w] (T a multiple of the time compression) -> [B, 2*latent, T/4, h, w]
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        mults = cfg.channel_multipliers
        top = f * mults[-1]
        self.time_up = [2 if d else 1 for d in cfg.temporal_downsample]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3)
        self.res_blocks = nn.ModuleList([ResBlock(top, top, g) for _ in range(n)])
        blocks, convs = [], []
        prev = top
        for i in reversed(range(len(mults))):
            width = f * mults[i]
            blocks.insert(0, nn.ModuleList([ResBlock(prev if j == 0 else width, width, g) for j in range(n)]))
            prev = width
            if i > 0:
                up = self.time_up[i - 1]
                convs.insert(0, CausalConv3d(prev, prev * up, 3) if up > 1 else nn.Identity())
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: [B, latent, t, h, w] -> [B, 4, t * 4, h, w]
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                up = self.time_up[i - 1]
                x = self.conv_blocks[i - 1](x)
                if up > 1:  # depth to time: channels (C, up) -> frames
                    b, c, t, h, w = x.shape
                    x = x.view(b, c // up, up, t, h, w).transpose(2, 3).reshape(b, c // up, t * up, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """The temporal stage: ``encode`` 4-channel frames -> posterior moments; ``decode`` back."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 4, F, h, w] -> moments [B, 2*embed, ceil(F / 4), h, w]; zero frames in front pad F
        tc = self.config.time_compression
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % tc, 0))
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        # z: [B, embed, t, h, w] -> [B, 4, num_frames, h, w] (the front padding dropped)
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, x.shape[2] - num_frames :]


# ----------------------------------------------------------------------------------------------
# the two-stage VAE


def latent_frames(num_frames: int, micro: int = 17, tc: int = 4) -> int:
    """Latent frames of ``num_frames`` pixel frames coded in chunks of ``micro``."""
    return (num_frames // micro) * -(-micro // tc) + -(-(num_frames % micro) // tc)


def pixel_frames(latent_t: int, micro: int = 17, tc: int = 4) -> int:
    """The frame count latents of ``latent_t`` frames decode to: 17 per whole chunk, 4m - 3 for a
    partial last chunk of m latent frames (the counts that round-trip)."""
    per = -(-micro // tc)
    rest = latent_t % per
    return (latent_t // per) * micro + (tc * rest - (tc - 1) if rest else 0)


def frame_rule(micro: int = 17, tc: int = 4) -> str:
    """The frame counts that round-trip, in words: "17k or 17k+4m+1" (m < the latent frames of a chunk)."""
    return f"{micro}k or {micro}k+{tc}m+1"


def frames_problem(num_frames: int, micro: int = 17, tc: int = 4, label: str | None = None) -> str | None:
    """Why the VAE cannot round-trip ``num_frames`` (with the nearest counts it can), or None;
    ``label`` names the value ("num_frames=20: ...", else "20 frames: ...")."""
    if num_frames >= 1 and pixel_frames(latent_frames(num_frames, micro, tc), micro, tc) == num_frames:
        return None
    valid = [pixel_frames(t, micro, tc) for t in range(1, latent_frames(max(num_frames, 1), micro, tc) + 2)]
    lo = max([v for v in valid if v < num_frames], default=None)
    hi = min(v for v in valid if v > num_frames)
    near = f"{lo} or {hi}" if lo else str(hi)
    what = f"{label}={num_frames}" if label else f"{num_frames} frames"
    return (f"{what}: Open-Sora's VAE codes 17-frame chunks (5 latent frames each) and takes 17k or "
            f"17k + 4m + 1 frames; nearest valid: {near}")


class OpenSoraVAE(VideoVAE):
    """Open-Sora 1.2's VAE: ``encode`` pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents
    [B, 4, T, H/8, W/8]; ``decode`` inverts it, 17 frames at a time."""

    def __init__(self, config: OpenSoraVAEConfig):
        super().__init__()
        self.config = config
        self.spatial_vae = nn.Module()
        self.spatial_vae.module = kl2d.KL2DVAE(config.spatial)
        self.temporal_vae = TemporalVAE(config.temporal)
        c = config.latent_channels
        self.register_buffer("shift", torch.tensor(config.shift, dtype=torch.float32).reshape(1, c, 1, 1, 1))
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float32).reshape(1, c, 1, 1, 1))

    # -- facts -------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.config.micro_frame_size, self.temporal_compression)

    def pixel_frames(self, latent_t: int) -> int:
        return pixel_frames(latent_t, self.config.micro_frame_size, self.temporal_compression)

    def frames_problem(self, num_frames: int) -> str | None:
        return frames_problem(num_frames, self.config.micro_frame_size, self.temporal_compression)

    def default_tiling(self) -> Tiling:
        half = self.config.spatial.sample_size // 2
        return Tiling(half, half, 0.25, 0.25)

    def latent_scaling(self):
        return tuple(float(v) for v in self.config.shift), tuple(1 / float(v) for v in self.config.scale)

    def decode_bytes(self, num_frames: int, height: int, width: int, chunk_frames: int = 4) -> int:
        """Peak memory of decoding: one chunk's temporal activations at the latent size, a
        micro-batch of full-resolution spatial activations, and the output."""
        cfg = self.config
        item = torch.finfo(self.dtype).bits // 8
        s = self.spatial_compression
        t_cfg = cfg.temporal
        temporal = 6 * (cfg.micro_latent_size * t_cfg.time_compression) * (height // s) * (width // s) * t_cfg.filters * max(t_cfg.channel_multipliers) * item
        spatial = 6 * min(chunk_frames, num_frames) * height * width * cfg.spatial.block_out_channels[0] * item
        return temporal + spatial + frames_bytes(num_frames, height, width)

    # -- coding ------------------------------------------------------------------------------
    def _encode_chunked(self, video: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        """Temporal posterior moments [B, 8, T, h, w] of pixels, 17 frames at a time; the spatial
        stage contributes its posterior mean (x 0.18215)."""
        spatial = self.spatial_vae.module
        out = []
        for i in range(0, video.shape[2], self.config.micro_frame_size):
            chunk = video[:, :, i : i + self.config.micro_frame_size]
            x = spatial.encode(chunk, chunk_frames=max(1, chunk_frames), scale=SPATIAL_SCALE)  # [B, 4, f, h, w]
            out.append(self.temporal_vae.encode(x.to(self.dtype)).float())
        return torch.cat(out, dim=2)

    def encode(self, video: torch.Tensor, sample: bool = False, noise: torch.Tensor | None = None, chunk_frames: int = 4,
               tiling: Tiling | None = None, scale: float | None = None) -> torch.Tensor:
        """Normalised latents ``(z - shift) / scale`` of pixels [B, 3, F, H, W] in [-1, 1]: the
        temporal posterior's mean, or a draw with ``noise`` when ``sample``. (The spatial stage
        always contributes its mean.) ``scale`` multiplies the result (default 1)."""
        z = super().encode(video, sample=sample, noise=noise, chunk_frames=chunk_frames, tiling=tiling, scale=1.0)
        z = (z - self.shift.to(z)) / self.scale.to(z)
        return z if scale is None else z * scale

    def decode(self, latents: torch.Tensor, chunk_frames: int = 4, tiling: Tiling | None = None,
               output_device: torch.device | str | None = None, progress=None, num_frames: int | None = None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] of normalised latents, one 17-frame chunk at a time
        (``output_device`` takes each chunk off the GPU as it is made; ``progress`` as
        :meth:`VideoVAE.decode`). ``num_frames``: the frame count to decode to (default: 17k + 4m
        - 3, the counts the family takes; a partial last chunk of m latent frames may hold up to
        4m frames, which the release decodes when told)."""
        t = latents.shape[2]
        frames = self.pixel_frames(t) if num_frames is None else int(num_frames)
        if self.latent_frames(frames) != t:
            held = [n for n in range(self.pixel_frames(t), self.pixel_frames(t) + self.temporal_compression) if self.latent_frames(n) == t]
            raise ValueError(f"num_frames={frames}: latents of {t} frames hold {' to '.join(map(str, sorted({held[0], held[-1]})))} frames")
        on_chunk = self._chunk_counter(latents, tiling, progress)
        return self._decode_tiled(latents, tiling, lambda z: self._decode_chunked(z, chunk_frames, output_device, on_chunk, frames))

    def _decode_chunked(self, z: torch.Tensor, chunk_frames: int, output_device, on_chunk=None, total: int | None = None) -> torch.Tensor:
        """Pixels of unscaled latents: ``total`` frames (default: what the latents round-trip)."""
        cfg = self.config
        z = z * self.scale.to(z) + self.shift.to(z)
        spatial = self.spatial_vae.module
        total = self.pixel_frames(z.shape[2]) if total is None else total
        out, done = None, 0
        for i in range(0, z.shape[2], cfg.micro_latent_size):
            n = min(cfg.micro_frame_size, total - done)
            x = self.temporal_vae.decode(z[:, :, i : i + cfg.micro_latent_size].to(self.dtype), n)  # [B, 4, n, h, w]
            frames = spatial._decode_chunked(x.float() / SPATIAL_SCALE, max(1, chunk_frames), output_device)  # [B, 3, n, H, W]
            if out is None:  # written in place: the output is never held twice
                out = frames.new_empty(*frames.shape[:2], total, *frames.shape[3:])
            out[:, :, done : done + n] = frames
            done += n
            if on_chunk is not None:  # a micro chunk (17 frames) is the unit the temporal VAE decodes
                on_chunk(min(cfg.micro_latent_size, z.shape[2] - i) * z.shape[0])
        return out

    def _check_video(self, video: torch.Tensor) -> None:
        # any frame count encodes (the release pads each chunk); only round-trippable ones are
        # offered by the family's rules
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        h, w = video.shape[-2:]
        s = self.spatial_compression
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {s}")


# ----------------------------------------------------------------------------------------------
# checkpoints

SPATIAL_PREFIX, TEMPORAL_PREFIX = "spatial_vae.module.", "temporal_vae."


def is_state_dict(keys) -> bool:
    """Open-Sora 1.2's VAE file (with or without its spatial stage: the loader says which)."""
    return f"{TEMPORAL_PREFIX}encoder.conv_in.conv.weight" in unwrapped_keys(keys)


def has_spatial(keys) -> bool:
    return any(k.startswith(SPATIAL_PREFIX) for k in unwrapped_keys(keys))


def infer_temporal(sd: dict[str, torch.Tensor], num_groups: int = 32) -> TemporalVAEConfig:
    """The temporal VAE's widths and block counts read off its weights (keys without the prefix)."""
    try:
        f = sd["encoder.conv_in.conv.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block_res_blocks."))
        n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("encoder.block_res_blocks.0."))
        mults = tuple(sd[f"encoder.block_res_blocks.{i}.0.conv1.conv.weight"].shape[0] // f for i in range(levels))
        down = tuple(f"encoder.conv_blocks.{i}.conv.weight" in sd for i in range(levels - 1))
        cfg = TemporalVAEConfig(
            in_out_channels=sd["encoder.conv_in.conv.weight"].shape[1], latent_embed_dim=sd["decoder.conv1.conv.weight"].shape[1],
            embed_dim=sd["post_quant_conv.conv.weight"].shape[1], filters=f, num_res_blocks=n, channel_multipliers=mults,
            temporal_downsample=down, num_groups=num_groups,
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a whole Open-Sora temporal VAE (missing {e})") from None
    widths = [f * m for m in mults]
    if any(w % cfg.num_groups for w in widths):
        cfg = dataclasses.replace(cfg, num_groups=math.gcd(*widths))  # (tiny test VAEs)
    return cfg


def config_from(sd: dict[str, torch.Tensor], raw: dict | None, path) -> OpenSoraVAEConfig:
    """Both stages' architecture from the weights; chunking, normalisation and GroupNorm groups
    from the released config.json (``vae_temporal`` named by preset or spelled out) where given,
    else the release's."""
    from ..checkpoint import CheckpointError

    raw = raw or {}
    temporal_raw = raw.get("vae_temporal") or {}
    kind = temporal_raw.get("type", "VAE_Temporal_SD")
    if kind not in ("VAE_Temporal", *TEMPORAL_PRESETS):
        raise CheckpointError(f"{path}: vae_temporal type {kind!r} is not an Open-Sora 1.2 temporal VAE; expected "
                              f"VAE_Temporal_SD (as released) or VAE_Temporal with its arguments")
    groups = int(temporal_raw.get("num_groups", TEMPORAL_PRESETS.get(kind, TemporalVAEConfig()).num_groups))
    if temporal_raw.get("activation_fn", "swish") != "swish":
        raise CheckpointError(f"{path}: vae_temporal activation_fn {temporal_raw['activation_fn']!r}; Open-Sora 1.2 uses swish")
    temporal_sd = {k[len(TEMPORAL_PREFIX):]: v for k, v in sd.items() if k.startswith(TEMPORAL_PREFIX)}
    spatial_sd = {k[len(SPATIAL_PREFIX):]: v for k, v in sd.items() if k.startswith(SPATIAL_PREFIX)}
    try:
        temporal = infer_temporal(temporal_sd, groups)
        spatial = kl2d.infer_config(spatial_sd, kl2d.KL2DConfig(scaling_factor=SPATIAL_SCALE))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for name, given in temporal_raw.items():  # spelled-out arguments must agree with the weights
        if name in ("filters", "num_res_blocks", "latent_embed_dim", "embed_dim", "in_out_channels"):
            if int(given) != getattr(temporal, name):
                raise CheckpointError(f"{path}: config.json says vae_temporal {name}={given} but the weights have {getattr(temporal, name)}")
    shift, scale = normalisation(raw)
    return OpenSoraVAEConfig(spatial=spatial, temporal=temporal, micro_frame_size=int(raw.get("micro_frame_size") or OpenSoraVAEConfig.micro_frame_size),
                             shift=shift, scale=scale)


def normalisation(raw: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The latents' per-channel (shift, scale) a released config.json gives (a number or a list
    each), else the release's."""
    raw, base = raw or {}, OpenSoraVAEConfig()
    vec = lambda v, default: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * len(default))) if v is not None else default  # noqa: E731
    return vec(raw.get("shift"), base.shift), vec(raw.get("scale"), base.scale)


def load_vae(path, dtype: torch.dtype | None = torch.float32, device="cpu", config: OpenSoraVAEConfig | None = None) -> OpenSoraVAE:
    """Open-Sora 1.2's VAE from the released folder (``config.json`` + ``model.safetensors``) or
    its weight file alone (the release's chunking and normalisation then)."""
    from ..checkpoint import CheckpointError, assign_state_dict, build_on_meta, describe, load_state_dict, read_json

    path = Path(path)
    sd = load_state_dict(path, dtype=dtype, device=device)
    if not is_state_dict(sd.keys()):
        raise CheckpointError(f"{path}: expected an Open-Sora 1.2 VAE, but this looks like {describe(sd.keys())}")
    sd = unwrap_prefixes(sd)
    if not has_spatial(sd.keys()):
        raise CheckpointError(f"{path}: holds Open-Sora's temporal VAE but not its spatial (SDXL) stage; the released "
                              "OpenSora-VAE-v1.2 model.safetensors holds both (spatial_vae.module.* and temporal_vae.*)")
    if config is None:
        raw = read_json(path / "config.json") if path.is_dir() and (path / "config.json").exists() else None
        config = config_from(sd, raw, path)
    c = config.latent_channels
    for name, values in (("shift", config.shift), ("scale", config.scale)):  # the config's values are the ones used
        sd[name] = torch.tensor(values, dtype=torch.float32, device=device).reshape(1, c, 1, 1, 1)
    model = build_on_meta(lambda: OpenSoraVAE(config))
    return assign_state_dict(model, sd, str(path), "an Open-Sora 1.2 VAE").eval()


__all__ = ["OpenSoraVAE", "OpenSoraVAEConfig", "TemporalVAEConfig", "load_vae", "latent_frames", "pixel_frames", "frames_problem"]
