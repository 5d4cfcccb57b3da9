"""What every VAE of the library shares: the :class:`VideoVAE` protocol and base class, spatial
tiling with blended overlaps, posterior sampling, and the conversions between ComfyUI frames
([F, H, W, 3] in [0, 1]) and VAE pixels ([B, 3, F, H, W] in [-1, 1]).

A VAE subclass provides ``_encode_chunked(video, chunk_frames) -> moments`` and
``_decode_chunked(latents, chunk_frames, output_device, on_chunk) -> pixels`` on unscaled latents
(calling ``on_chunk(n)``, when given, after each chunk with the latent frames it decoded, counted
over the batch), its
``config`` (``latent_channels``, ``scaling_factor``, ``spatial_compression``,
``temporal_compression_ratio``, ``in_channels``) and ``default_tiling``; encoding, decoding,
tiling, scaling and input checks are here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..memory import available_bytes


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles in pixels and their overlap fractions (defaults: CogVideoX's release)."""

    tile_height: int = 240
    tile_width: int = 360
    overlap_height: float = 1 / 6
    overlap_width: float = 1 / 5


# ----------------------------------------------------------------------------------------------
# frames <-> pixels


def frames_to_pixels(frames: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Frames [F, H, W, 3] in [0, 1] -> VAE pixels [1, 3, F, height, width] in [-1, 1] (float32),
    resized (bilinear, antialiased) when a size is given and differs."""
    x = frames.float().permute(0, 3, 1, 2)  # [F, 3, H, W]
    if height is not None and x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).permute(1, 0, 2, 3)[None]


def pixels_to_frames(video: torch.Tensor) -> torch.Tensor:
    """VAE pixels [3, F, H, W] (one video) in [-1, 1] -> frames [F, H, W, 3] in [0, 1] (float32)."""
    return (video.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def image_tensor(image) -> torch.Tensor:
    """A ComfyUI IMAGE ([1, H, W, 3] or [H, W, 3], 0..1) or a PIL image -> [1, H, W, 3]."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32) / 255.0
        image = torch.from_numpy(arr)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[-1] != 3:
        raise ValueError(f"image must be [1, H, W, 3] or [H, W, 3] with values in 0..1, got {tuple(image.shape)}")
    return image


def sample_posterior(moments: torch.Tensor, noise: torch.Tensor | None = None, dim: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the diagonal Gaussian whose mean and log-variance are ``moments`` split along
    ``dim``; ``noise`` (standard normal, shaped like the mean) or ``generator`` make it reproducible."""
    mean, logvar = moments.float().chunk(2, dim=dim)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean + (0.5 * logvar.clamp(-30.0, 20.0)).exp() * noise.to(mean)


def frames_problem(num_frames: int, temporal_compression: int) -> str | None:
    """Why a causal VAE cannot take ``num_frames`` (it takes 1 or k * compression + 1), or None."""
    tc = temporal_compression
    if tc == 1 or (num_frames >= 1 and (num_frames - 1) % tc == 0):
        return None
    lo = max(1, (num_frames - 1) // tc * tc + 1)
    return f"{num_frames} frames: the VAE takes 1 or {tc}k+1 frames; nearest valid: {lo} or {lo + tc}"


# ----------------------------------------------------------------------------------------------
# spatial tiling


def frames_bytes(num_frames: int, height: int, width: int) -> int:
    """Decoded frames in float32, counted twice (the output and a conversion of it)."""
    return 2 * num_frames * 3 * height * width * 4


def _blend_rows(a: torch.Tensor, b: torch.Tensor, extent: int) -> None:
    """Fade the first ``extent`` rows of ``b`` in from the last rows of ``a`` (in place)."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent <= 0:
        return
    w = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).to(b.dtype).view(1, 1, 1, -1, 1)
    b[:, :, :, :extent] = a[:, :, :, -extent:] * (1 - w) + b[:, :, :, :extent] * w


def _blend_cols(a: torch.Tensor, b: torch.Tensor, extent: int) -> None:
    extent = min(a.shape[4], b.shape[4], extent)
    if extent <= 0:
        return
    w = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).to(b.dtype).view(1, 1, 1, 1, -1)
    b[:, :, :, :, :extent] = a[:, :, :, :, -extent:] * (1 - w) + b[:, :, :, :, :extent] * w


def tile_grid(tiling: Tiling, s: int) -> tuple[int, int, int, int]:
    """(tile height, tile width, step down, step right) in latent units.

    Tiles start one step apart and overlap by ``tile - step``; each contributes ``step`` rows and
    columns after blending. On CogVideoX's 240x360-pixel tiles this is exactly diffusers' tiling
    (steps of 200 and 288 pixels, blends of 40 and 72), and it stays aligned for any tile size.
    """
    lat_h, lat_w = tiling.tile_height // s, tiling.tile_width // s
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"tiles of {tiling.tile_height}x{tiling.tile_width} pixels are smaller than one latent ({s} pixels)")
    step_h = max(1, int(lat_h * (1 - tiling.overlap_height)))
    step_w = max(1, int(lat_w * (1 - tiling.overlap_width)))
    return lat_h, lat_w, step_h, step_w


def stitch(tiles: list[list[torch.Tensor]], blend_h: int, blend_w: int, keep_h: int, keep_w: int) -> torch.Tensor:
    """Blend each tile into its upper and left neighbours (in order, in place) and crop."""
    rows = []
    for i, row in enumerate(tiles):
        out = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_rows(tiles[i - 1][j], tile, blend_h)
            if j > 0:
                _blend_cols(row[j - 1], tile, blend_w)
            out.append(tile[:, :, :, :keep_h, :keep_w])
        rows.append(torch.cat(out, dim=4))
    return torch.cat(rows, dim=3)


# ----------------------------------------------------------------------------------------------
# the protocol


class VideoVAE(nn.Module):
    """A video VAE: ``encode(video) -> latents`` from pixels [B, 3, F, H, W] in [-1, 1], scaled
    latents [B, C, T, h, w]; ``decode(latents)`` inverts it. An image is a one-frame video."""

    config: object

    # -- facts -------------------------------------------------------------------------------
    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression_ratio

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def info(self) -> dict:
        """What conditioning code needs to know of the latents (scaling and family flags)."""
        return {"scaling_factor": self.config.scaling_factor}

    def latent_scaling(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(shift, scale) per channel from raw latents to the scaled ones :meth:`encode` gives:
        ``scaled = (raw - shift) * scale``."""
        return (0.0,) * self.latent_channels, (float(self.scaling_factor),) * self.latent_channels

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1

    def pixel_frames(self, latent_t: int) -> int:
        """Frames decoded from ``latent_t`` latent frames."""
        return (latent_t - 1) * self.temporal_compression + 1

    def frames_problem(self, num_frames: int) -> str | None:
        return frames_problem(num_frames, self.temporal_compression)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @device.setter
    def device(self, value) -> None:
        """Ignored: the weights say where the model is (ComfyUI's model manager assigns this)."""

    def default_tiling(self) -> Tiling:
        raise NotImplementedError

    def decode_bytes(self, num_frames: int, height: int, width: int, chunk_frames: int = 2) -> int:
        """A rough upper estimate of decoding's peak memory: a chunk's widest full-resolution
        activations (a few live at once) plus the decoded frames."""
        widest = getattr(self.config, "block_out_channels", (128,))[0]  # the full-resolution stage's width
        chunk = min(num_frames, chunk_frames * self.temporal_compression)
        item = torch.finfo(self.dtype).bits // 8
        return 6 * chunk * height * width * widest * item + frames_bytes(num_frames, height, width)

    def auto_tiling(self, num_frames: int, height: int, width: int) -> Tiling | None:
        """:meth:`tiling_for_memory` with the memory free on the VAE's device now."""
        return self.tiling_for_memory(num_frames, height, width, available_bytes(self.device))

    def tiling_for_memory(self, num_frames: int, height: int, width: int, free: int | None) -> Tiling | None:
        """Tiles sized from the memory free at decode time: None (untiled) when decoding the whole
        frame is estimated (:meth:`decode_bytes`) to fit in ``free`` bytes; else the largest tiles
        of the frame's aspect, in whole latents and with the model's overlaps, estimated to fit;
        never smaller than a quarter of the default tile's side (an out-of-memory error is then
        left to the caller's retry)."""
        if free is None or self.decode_bytes(num_frames, height, width) <= free:
            return None
        s = self.spatial_compression
        default = self.default_tiling()
        floor_h, floor_w = max(2 * s, default.tile_height // 4 // s * s), max(2 * s, default.tile_width // 4 // s * s)
        r = 1.0
        while True:
            r *= 0.9
            th, tw = max(floor_h, int(height * r) // s * s), max(floor_w, int(width * r) // s * s)
            if self.decode_bytes(num_frames, th, tw) <= free or (th, tw) == (floor_h, floor_w):
                return Tiling(th, tw, default.overlap_height, default.overlap_width)

    # -- what a VAE implements -----------------------------------------------------------------
    def _encode_chunked(self, video: torch.Tensor, chunk_frames: int) -> torch.Tensor:
        raise NotImplementedError

    def _decode_chunked(self, z: torch.Tensor, chunk_frames: int, output_device, on_chunk=None) -> torch.Tensor:
        raise NotImplementedError

    # -- encoding ----------------------------------------------------------------------------
    def encode_moments(self, video: torch.Tensor, chunk_frames: int = 8, tiling: Tiling | None = None) -> torch.Tensor:
        """Posterior mean and log-variance [B, 2C, T, h, w] of pixels in [-1, 1]."""
        self._check_video(video)
        s = self.spatial_compression
        h, w = video.shape[-2:]
        if tiling is None or (h <= tiling.tile_height and w <= tiling.tile_width):
            return self._encode_chunked(video, chunk_frames)
        lat_h, lat_w, step_h, step_w = tile_grid(tiling, s)
        tiles = [
            [self._encode_chunked(video[:, :, :, i : i + s * lat_h, j : j + s * lat_w], chunk_frames) for j in range(0, w, s * step_w)]
            for i in range(0, h, s * step_h)
        ]
        return stitch(tiles, lat_h - step_h, lat_w - step_w, step_h, step_w)

    def encode(
        self,
        video: torch.Tensor,
        sample: bool = False,
        noise: torch.Tensor | None = None,
        chunk_frames: int = 8,
        tiling: Tiling | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Scaled latents of ``video`` (pixels in [-1, 1], [B, 3, F, H, W]).

        The posterior mean by default; ``sample=True`` draws from the posterior, with ``noise``
        (standard normal, shaped like the latents) when given. ``scale`` replaces the config's
        scaling factor (CogVideoX 1.5 image-to-video conditions on latents / scaling_factor).
        """
        moments = self.encode_moments(video, chunk_frames, tiling)
        z = sample_posterior(moments, noise) if sample else moments.float().chunk(2, dim=1)[0]
        return z * (self.scaling_factor if scale is None else scale)

    # -- decoding ----------------------------------------------------------------------------
    def decode(
        self,
        latents: torch.Tensor,
        chunk_frames: int = 2,
        tiling: Tiling | None = None,
        output_device: torch.device | str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1, 1] (float32 or the VAE's dtype), [B, 3, F, H, W], from scaled latents.

        ``output_device`` (e.g. "cpu") moves each decoded chunk off the GPU as it is made, so a
        long video never holds all its frames in GPU memory. ``progress(done, total)`` is called
        after each decoded chunk (of each tile), in latent frames; an exception it raises (a
        cancel) stops the decode there.
        """
        on_chunk = self._chunk_counter(latents, tiling, progress)
        return self._decode_tiled(latents, tiling, lambda z: self._decode_chunked(z, chunk_frames, output_device, on_chunk))

    def _chunk_counter(self, latents: torch.Tensor, tiling: Tiling | None, progress) -> Callable[[int], None] | None:
        """The ``on_chunk`` that turns each chunk's latent frames into ``progress(done, total)``
        over the whole decode: every sample's frames in every spatial tile."""
        if progress is None:
            return None
        s, (h, w) = self.spatial_compression, latents.shape[-2:]
        tiles = 1
        if tiling is not None and (h > tiling.tile_height // s or w > tiling.tile_width // s):  # as _decode_tiled tiles
            _, _, step_h, step_w = tile_grid(tiling, s)
            tiles = len(range(0, h, step_h)) * len(range(0, w, step_w))
        total, done = latents.shape[0] * latents.shape[2] * tiles, 0

        def on_chunk(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        return on_chunk

    def _decode_tiled(self, latents: torch.Tensor, tiling: Tiling | None, decode_tile) -> torch.Tensor:
        """``decode_tile`` (unscaled latents -> pixels) over spatial tiles of ``latents``, blended."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [B, {self.latent_channels}, T, h, w], got {tuple(latents.shape)}")
        z = latents.float() * (1 / self.scaling_factor)  # as the reference pipelines scale
        s = self.spatial_compression
        h, w = z.shape[-2:]
        if tiling is None or (h <= tiling.tile_height // s and w <= tiling.tile_width // s):
            return decode_tile(z)
        lat_h, lat_w, step_h, step_w = tile_grid(tiling, s)
        tiles = [[decode_tile(z[:, :, :, i : i + lat_h, j : j + lat_w]) for j in range(0, w, step_w)] for i in range(0, h, step_h)]
        return stitch(tiles, s * (lat_h - step_h), s * (lat_w - step_w), s * step_h, s * step_w)

    def _check_video(self, video: torch.Tensor) -> None:
        cin = self.config.in_channels
        if video.ndim != 5 or video.shape[1] != cin:
            raise ValueError(f"expected video [B, {cin}, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        s = self.spatial_compression
        problem = self.frames_problem(f)
        if problem:
            raise ValueError(problem)
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {s}")
