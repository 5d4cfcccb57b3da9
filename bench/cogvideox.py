"""CogVideoX side by side with diffusers: same weights (random, saved once), same inputs.

    python bench/cogvideox.py                                   # CPU: a small config, minutes
    python bench/cogvideox.py --size 2b --device cuda --dtype bf16   # real 2B, 49x480x720
    python bench/cogvideox.py --size 5b --device cuda --dtype bf16

Prints, as ours/diffusers ratios: transformer forward time; a sampling run (CFG, DDIM) time;
VAE decode time and peak memory as the number of frames grows (diffusers with tiling and
slicing on, ours chunked with its defaults). Every case runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, ratio, run_worker, weights_once  # noqa: E402

SIZES = {
    # transformer, VAE channels, (frames, height, width) of the transformer/sampling cases
    "small": dict(
        transformer=dict(num_layers=4, num_attention_heads=8, use_rotary_positional_embeddings=True),
        vae=dict(block_out_channels=(64, 128, 128, 256)),
        video=(17, 256, 384),
        vae_size=(128, 192),
    ),
    "2b": dict(transformer=dict(), vae=dict(), video=(49, 480, 720), vae_size=(480, 720)),
    "5b": dict(
        transformer=dict(num_layers=42, num_attention_heads=48, use_rotary_positional_embeddings=True),
        vae=dict(scaling_factor=0.7),
        video=(49, 480, 720),
        vae_size=(480, 720),
    ),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def setup(size: str) -> Path:
    """Random weights for the size, saved once in the diffusers layout."""
    return weights_once("cogvideox", size, SIZES[size], _make_weights)


def _make_weights(root: Path, spec: dict) -> None:
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    big = spec != SIZES["small"]  # billions of parameters: materialise small random values directly
    with torch.device("meta") if big else torch.device("cpu"):
        tf = CogVideoXTransformer3DModel(**spec["transformer"])
    if big:
        tf = tf.to_empty(device="cpu")
        for p in tf.parameters():
            torch.nn.init.normal_(p, std=0.02)
    tf.save_pretrained(str(root / "transformer"), safe_serialization=True)
    del tf
    AutoencoderKLCogVideoX(**spec["vae"]).save_pretrained(str(root / "vae"), safe_serialization=True)


def _inputs(args, torch, cfg_dim):
    frames, h, w = SIZES[args.size]["video"]
    g = torch.Generator().manual_seed(0)
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, h // 8, w // 8, generator=g)
    ctx = torch.randn(1, 226, cfg_dim, generator=g)
    return x, ctx


def worker(args) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    dev = args.device
    root = Path(args.root)
    kind, impl = args.worker.split(":")
    if kind in ("forward", "sample"):
        from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

        from vdit_core.models.cogvideox import load_transformer
        from vdit_core.families.cogvideox import release_schedule
        from vdit_core.pipeline import Pipeline as Ours
        from vdit_core.schedules import DiscreteSchedule

        if impl == "ours":
            model = load_transformer(root / "transformer", dtype=dtype, device=dev)
            dim = model.config.text_embed_dim
        else:
            model = CogVideoXTransformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=dtype).to(dev).eval()
            dim = model.config.text_embed_dim
        x, ctx = _inputs(args, torch, dim)
        x, ctx = x.to(dev), ctx.to(dev, dtype)
        if kind == "forward":
            t = torch.tensor([500.0], device=dev)
            if impl == "ours":
                fn = lambda: model(x, t, ctx)  # noqa: E731
            else:
                from diffusers.models.embeddings import get_3d_rotary_pos_embed
                from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

                c = model.config
                rope = None
                if c.use_rotary_positional_embeddings:
                    gh, gw = x.shape[3] // 2, x.shape[4] // 2
                    crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // 2, c.sample_height // 2)
                    rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), x.shape[2], device=dev)
                xr = x.permute(0, 2, 1, 3, 4).to(dtype)
                fn = lambda: model(hidden_states=xr, encoder_hidden_states=ctx, timestep=t.long(), image_rotary_emb=rope, return_dict=False)  # noqa: E731
            with torch.no_grad():
                res = measure(fn, dev, repeat=args.repeat)
            return {"case": args.worker, **res}
        steps = args.steps
        if impl == "ours":
            pipe = Ours(transformer=model, vae=None, text_encoder=None, schedule=DiscreteSchedule.from_config(release_schedule(model.config)))
            cond, uncond = {"context": ctx}, {"context": torch.zeros_like(ctx)}
            fn = lambda: pipe.sample(cond, uncond, x, steps=steps, cfg=6.0, sampler="ddim", progress=False)  # noqa: E731
        else:
            sched = CogVideoXDDIMScheduler(snr_shift_scale=1.0 if model.config.use_rotary_positional_embeddings else 3.0,
                                           prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False)
            pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            frames, h, w = SIZES[args.size]["video"]
            fn = lambda: pipe(prompt_embeds=ctx, negative_prompt_embeds=torch.zeros_like(ctx), num_frames=frames, height=h, width=w,  # noqa: E731
                              num_inference_steps=steps, guidance_scale=6.0, latents=x.permute(0, 2, 1, 3, 4).to(dtype), output_type="latent")
        with torch.no_grad():
            res = measure(fn, dev, repeat=1, warmup=0)
        return {"case": args.worker, **res, "s_per_step": res["s"] / steps}
    if kind == "vae":
        from diffusers import AutoencoderKLCogVideoX

        from vdit_core.vae.cogvideox_vae import load_vae

        frames = args.frames
        h, w = SIZES[args.size]["vae_size"]
        z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(0)).to(dev)
        if impl == "ours":
            vae = load_vae(root / "vae", dtype=dtype, device=dev)
            fn = lambda: vae.decode(z, output_device="cpu" if dev.startswith("cuda") else None)  # noqa: E731
        else:
            vae = AutoencoderKLCogVideoX.from_pretrained(str(root / "vae"), torch_dtype=dtype).to(dev).eval()
            vae.enable_tiling()
            vae.enable_slicing()
            fn = lambda: vae.decode(z.to(dtype) / vae.config.scaling_factor).sample  # noqa: E731
        with torch.no_grad():
            res = measure(fn, dev, repeat=1, warmup=0)
        return {"case": args.worker, "frames": frames, **res}
    raise ValueError(args.worker)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--vae-frames", default="9,17,33,49")
    p.add_argument("--sections", default="forward,sample,vae")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    root = setup(args.size)
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
              "--repeat", str(args.repeat), "--root", str(root)]
    frames, h, w = SIZES[args.size]["video"]
    print(f"CogVideoX {args.size} on {args.device} ({args.dtype}); video {frames}x{h}x{w}; ratios are ours/diffusers")
    sections = args.sections.split(",")
    for kind in ("forward", "sample"):
        if kind not in sections:
            continue
        ours = run_worker(__file__, [*common, "--worker", f"{kind}:ours"])
        ref = run_worker(__file__, [*common, "--worker", f"{kind}:ref"])
        if "error" in ours or "error" in ref:
            print(f"{kind}: failed: {ours.get('error') or ref.get('error')}")
            continue
        label = "transformer forward" if kind == "forward" else f"sampling, {args.steps} DDIM steps with CFG"
        extra = f", {ours['s_per_step']:.3f} vs {ref['s_per_step']:.3f} s/step" if kind == "sample" else ""
        print(f"{label}: ours {ours['s']:.3f} s, diffusers {ref['s']:.3f} s, time ratio {ratio(ours['s'], ref['s'])}{extra}; "
              f"peak {ours['peak_mib']:.0f} vs {ref['peak_mib']:.0f} MiB, ratio {ratio(ours['peak_mib'], ref['peak_mib'])}")
    if "vae" in sections:
        vh, vw = SIZES[args.size]["vae_size"]
        print(f"VAE decode at {vh}x{vw} (diffusers: tiling + slicing on)")
        print(f"{'frames':>7} {'ours s':>9} {'ref s':>9} {'time ratio':>11} {'ours MiB':>10} {'ref MiB':>10} {'mem ratio':>10}")
        for f in [int(x) for x in args.vae_frames.split(",")]:
            ours = run_worker(__file__, [*common, "--worker", "vae:ours", "--frames", str(f)])
            ref = run_worker(__file__, [*common, "--worker", "vae:ref", "--frames", str(f)])
            if "error" in ours or "error" in ref:
                print(f"{f:>7}: failed: {ours.get('error') or ref.get('error')}")
                continue
            print(f"{f:>7} {ours['s']:>9.2f} {ref['s']:>9.2f} {ratio(ours['s'], ref['s']):>11} {ours['peak_mib']:>10.0f} "
                  f"{ref['peak_mib']:>10.0f} {ratio(ours['peak_mib'], ref['peak_mib']):>10}")


if __name__ == "__main__":
    main()
