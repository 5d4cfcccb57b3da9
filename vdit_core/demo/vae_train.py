"""Training the demo's CogVideoX-architecture VAE from scratch.

Reconstruction (L1 + MSE, object pixels weighted up: the background is most of every frame but
says nothing about colour or shape) plus a KL term (1e-4: enough to keep the latent regularised;
at 1e-5 the posterior std fell to 0.3% of the latent std), on 9-frame windows and spatial crops
of the training clips, most of them centred on the moving object (the VAE is convolutional and
causal, so windows and crops teach it the whole clip). The scaling factor is set afterwards to
1 / std of the encoded latents, as latent diffusion models do.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from ..vae.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig

DEMO_VAE = CogVideoXVAEConfig(
    block_out_channels=(16, 32, 64, 64),  # wide only where it is cheap (low resolution)
    # 2, not the released 16: one shape on a plain background needs few numbers, and a compact
    # latent is easier for the small transformer (see the README's demo section for the figures)
    latent_channels=2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_height=64,
    sample_width=64,
    scaling_factor=1.0,  # set from the data after training
)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [0, 1]."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _pixels(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips [B, F, H, W, 3] -> VAE pixels [B, 3, F, H, W] in [-1, 1]."""
    return clips.float().div(255).permute(0, 4, 1, 2, 3) * 2 - 1


def _contrast(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's background (its median colour, per channel) [B, 3, 1, 1, 1] and each pixel's
    largest difference from it [B, 1, F, H, W], for clips [B, 3, F, H, W]."""
    bg = video.flatten(2).median(dim=2).values[..., None, None, None]
    return bg, (video - bg).abs().amax(1, keepdim=True)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine from the full learning rate down to a tenth of it over ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def _weighted_error(rec: torch.Tensor, video: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 + MSE per pixel, averaged under ``weight``."""
    err = (rec - video).abs() + (rec - video).pow(2)
    return (weight * err).mean() / weight.mean()


def train_vae(
    clips: torch.Tensor,
    config: CogVideoXVAEConfig = DEMO_VAE,
    steps: int = 1200,
    batch: int = 8,
    lr: float = 1e-3,
    window: int = 9,
    crop: int = 32,
    kl_weight: float = 1e-4,
    object_crops: float = 0.8,
    object_weight: float = 9.0,
    seed: int = 0,
    log=print,
) -> CogVideoXVAE:
    """Train a VAE on ``clips`` [N, F, H, W, 3] uint8; returns it in eval mode, scaled."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = CogVideoXVAE(config)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    n, f, h, w, _ = clips.shape
    centres = _object_centres(clips)  # [N, F, 2] (y, x), for crops that hold the object
    t0 = time.perf_counter()
    bar = trange(steps, desc="training the VAE", dynamic_ncols=True)
    for step in bar:
        xs = []
        for _ in range(batch):
            i = rng.randrange(n)
            s = rng.randrange(f - window + 1)
            if rng.random() < object_crops:
                cy, cx = centres[i, s + window // 2].tolist()
                y = int(min(max(cy - crop / 2 + rng.uniform(-crop / 4, crop / 4), 0), h - crop))
                x = int(min(max(cx - crop / 2 + rng.uniform(-crop / 4, crop / 4), 0), w - crop))
            else:
                y, x = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
            xs.append(clips[i, s : s + window, y : y + crop, x : x + crop])
        video = _pixels(torch.stack(xs))  # [B, 3, F, H, W]
        mean, logvar = vae.encode_moments(video).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = vae.decode(z * config.scaling_factor)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        weight = 1 + object_weight * (_contrast(video)[1] > 0.2).float()
        loss = _weighted_error(rec, video, weight) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    # the scaling factor: unit variance latents for the diffusion model
    with torch.no_grad():
        sample = clips[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, 64)]]
        video = _pixels(sample)
        means = torch.cat([vae.encode_moments(v[None]).chunk(2, dim=1)[0] for v in video])
        std = means.std().item()
    from dataclasses import replace

    scaled = CogVideoXVAE(replace(config, scaling_factor=1.0 / std))
    scaled.load_state_dict(vae.state_dict())
    log(f"VAE: {steps} steps in {time.perf_counter() - t0:.0f} s; latent std {std:.3f} -> scaling factor {1 / std:.4f}")
    return scaled.eval()


def _object_centres(clips: torch.Tensor) -> torch.Tensor:
    """Centroid (y, x) of what differs from the background, per clip and frame; the frame centre
    when nothing does."""
    n, f, h, w, _ = clips.shape
    out = torch.empty(n, f, 2)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    for i in range(n):
        x = clips[i].float()
        bg = x.reshape(-1, 3).median(0).values
        m = ((x - bg).abs().amax(-1) > 50).float()  # [F, H, W]
        area = m.sum((1, 2)).clamp(min=1)
        cy, cx = (m * ys).sum((1, 2)) / area, (m * xs).sum((1, 2)) / area
        empty = m.sum((1, 2)) == 0
        out[i, :, 0] = torch.where(empty, torch.full_like(cy, h / 2), cy)
        out[i, :, 1] = torch.where(empty, torch.full_like(cx, w / 2), cx)
    return out


@torch.no_grad()
def reconstruction_psnr(vae: CogVideoXVAE, clips: torch.Tensor) -> float:
    """Mean PSNR of encoding and decoding whole clips [N, F, H, W, 3] (uint8 or [0, 1])."""
    values = []
    for clip in clips:
        x = clip.float() / (255.0 if clip.dtype == torch.uint8 else 1.0)
        video = x.permute(3, 0, 1, 2)[None] * 2 - 1
        rec = vae.decode(vae.encode(video))[0].permute(1, 2, 3, 0)
        values.append(psnr((rec / 2 + 0.5).clamp(0, 1), x))
    return sum(values) / len(values)


def shape_weights(video: torch.Tensor, band: int = 5, window: int = 7, diff: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a decoder's errors change how a shape reads, for clips [B, 3, F, H, W] in [-1, 1].

    Returns the half-maximum silhouette (as the evaluator reads it), the outline band around it
    and its corners, each [B, 1, F, H, W] in [0, 1]. Corners are where the silhouette's edge turns
    within ``window`` pixels: the smaller eigenvalue of the edge's structure tensor, which is
    about 0 along a straight edge and along these circles' gentle curve (at most 0.005) and
    0.02 at a square's or a triangle's corner. ``diff``: the clips' contrast (``_contrast``), when
    the caller has it.
    """
    if diff is None:
        diff = _contrast(video)[1]  # [B, 1, F, H, W]
    peak = diff.flatten(1).amax(1)[:, None, None, None, None]
    mask = (diff >= 0.5 * peak).float()
    flat = mask.transpose(1, 2).flatten(0, 1)  # [B*F, 1, H, W]: the shapes are 2D per frame
    pad = band // 2
    outline = F.max_pool2d(flat, band, 1, pad) + F.max_pool2d(-flat, band, 1, pad)  # dilated - eroded
    smooth = F.avg_pool2d(flat, 3, 1, 1, count_include_pad=False)
    gx = F.pad(smooth[..., :, 2:] - smooth[..., :, :-2], (1, 1, 0, 0)) / 2
    gy = F.pad(smooth[..., 2:, :] - smooth[..., :-2, :], (0, 0, 1, 1)) / 2
    local = lambda t: F.avg_pool2d(t, window, 1, window // 2, count_include_pad=False)  # noqa: E731
    sxx, syy, sxy = local(gx * gx), local(gy * gy), local(gx * gy)
    smaller = (sxx + syy) / 2 - (((sxx - syy) / 2) ** 2 + sxy**2).sqrt()
    corner = ((smaller - 0.004) / 0.01).clamp(0, 1)
    unflat = lambda t: t.unflatten(0, (video.shape[0], video.shape[2])).transpose(1, 2)  # noqa: E731
    return mask, unflat(outline), unflat(corner)


def finetune_decoder(
    vae: CogVideoXVAE,
    clips: torch.Tensor,
    steps: int = 600,
    batch: int = 4,
    lr: float = 3e-4,
    object_weight: float = 9.0,
    outline_weight: float = 4.0,
    corner_weight: float = 24.0,
    silhouette_weight: float = 1.0,
    seed: int = 0,
    log=print,
) -> CogVideoXVAE:
    """Fine-tune ``vae``'s decoder on ``clips`` [N, F, H, W, 3] uint8 with the encoder frozen, so
    its latents (and a transformer trained on them) stay valid.

    The VAE's own loss blurs what few pixels it has to spend: a square's corners, which are all
    that tells it from a circle. Here the reconstruction loss is weighted up on the shapes'
    outlines and corners (``shape_weights``), and a soft half-maximum silhouette (the
    evaluator's reading of the decoded clip) is matched to the clip's own, on whole clips.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters()) if vae.post_quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    n = clips.shape[0]
    t0 = time.perf_counter()
    with torch.no_grad():  # the frozen encoder's posterior, once per clip
        moments = torch.cat([vae.encode_moments(_pixels(clips[i : i + 16])) for i in range(0, n, 16)])
    log(f"decoder fine-tune: {n} clips encoded in {time.perf_counter() - t0:.0f} s")
    mean, logvar = moments.chunk(2, dim=1)
    std = (0.5 * logvar.clamp(-30, 20)).exp()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    bar = trange(steps, desc="fine-tuning the VAE decoder", dynamic_ncols=True)
    for step in bar:
        idx = torch.tensor([rng.randrange(n) for _ in range(batch)])
        video = _pixels(clips[idx])  # [B, 3, F, H, W]
        z = mean[idx] + std[idx] * torch.randn_like(mean[idx])  # posterior samples, as the VAE was trained
        rec = vae.decode(z * vae.scaling_factor)
        bg, diff = _contrast(video)  # once per batch: the median is the costly part
        mask, outline, corner = shape_weights(video, diff=diff)
        weight = 1 + object_weight * (diff > 0.2).float() + outline_weight * outline + corner_weight * corner
        recon = _weighted_error(rec, video, weight)
        # the evaluator's silhouette, soft: how far above half the clip's peak contrast each pixel is
        peak = diff.flatten(1).amax(1)[:, None, None, None, None]
        soft = ((rec - bg).abs().amax(1, keepdim=True) - 0.5 * peak) / (0.05 * peak)
        sil_w = 1 + outline_weight * outline + corner_weight * corner
        sil = (sil_w * F.binary_cross_entropy_with_logits(soft, mask, reduction="none")).mean() / sil_w.mean()
        loss = recon + silhouette_weight * sil
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(recon=f"{recon.item():.4f}", sil=f"{sil.item():.4f}")
    for p in vae.parameters():
        p.requires_grad_(False)
    log(f"decoder fine-tune: {steps} steps in {time.perf_counter() - t0:.0f} s")
    return vae.eval()
