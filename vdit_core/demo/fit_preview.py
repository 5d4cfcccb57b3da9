"""Fit the demo model's latent -> RGB preview factors by least squares against its own VAE.

    python -m vdit_core.demo.fit_preview            # prints the factors
    python -m vdit_core.demo.fit_preview --write    # stores them in the model's model_index.json

Clips of the demo world are encoded; each latent cell is paired with the mean colour of the
pixels it covers (in the frame it stands for: causal latent t is pixel frame 4t); a linear map
with a bias is fitted. Previews (``_vdit_defaults.latent_rgb``) then show the shape's colour
and place while sampling, with no VAE involved.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from . import MODEL_DIR
from .shapes import ALL_COMBOS, render


def fit(vae, clips: torch.Tensor) -> tuple[list[list[float]], list[float], float]:
    """(factors [C][3], bias [3], RMS error in [-1, 1] units) of latents -> cell colours.
    ``clips``: [N, F, H, W, 3] in [0, 1]."""
    pixels = clips.permute(0, 4, 1, 2, 3) * 2 - 1  # [N, 3, F, H, W]
    with torch.no_grad():
        z = vae.encode(pixels)  # [N, C, T, h, w], scaled as the sampler sees them
    s, tc = vae.spatial_compression, vae.temporal_compression
    frames = pixels[:, :, :: tc][:, :, : z.shape[2]]  # the pixel frame each latent frame stands for
    n, _, t, h, w = frames.shape
    target = F.avg_pool2d(frames.transpose(1, 2).reshape(n * t, 3, h, w), s).reshape(n, t, 3, h // s, w // s).transpose(1, 2)
    a = torch.cat([z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1]), torch.ones(z[:, 0].numel(), 1)], dim=1).double()
    y = target.permute(0, 2, 3, 4, 1).reshape(-1, 3).double()
    sol = torch.linalg.lstsq(a, y).solution  # [C + 1, 3]
    rms = (a @ sol - y).pow(2).mean().sqrt().item()
    return [[round(v, 4) for v in row] for row in sol[:-1].tolist()], [round(v, 4) for v in sol[-1].tolist()], rms


def main(argv: list[str] | None = None) -> int:
    from ..families import for_folder

    p = argparse.ArgumentParser(prog="python -m vdit_core.demo.fit_preview", description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=4, help="clips per shape/colour/motion combination")
    p.add_argument("--write", action="store_true", help="store the factors in the demo model's model_index.json")
    args = p.parse_args(argv)
    rng = random.Random(0)
    clips = torch.stack([render(c, rng) for c in ALL_COMBOS for _ in range(args.clips)])
    vae = for_folder(MODEL_DIR).load_vae(MODEL_DIR / "vae", torch.float32, "cpu")
    factors, bias, rms = fit(vae, clips)
    print(json.dumps({"latent_rgb": [factors, bias]}), f"(RMS error {rms:.3f} on [-1, 1], {len(clips)} clips)")
    if args.write:
        index_path = MODEL_DIR / "model_index.json"
        index = json.loads(index_path.read_text())
        index.setdefault("_vdit_defaults", {})["latent_rgb"] = [factors, bias]
        index_path.write_text(json.dumps(index, indent=2))
        print(f"wrote {index_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
