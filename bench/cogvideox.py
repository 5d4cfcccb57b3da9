"""CogVideoX side by side with diffusers: same weights (random, saved once), same inputs.

    python bench/cogvideox.py                                   # CPU: 6 layers of a 5B-style model, minutes
    python bench/cogvideox.py --size 2b --device cuda --dtype bf16   # real 2B, 49x480x720
    python bench/cogvideox.py --size 5b --device cuda --dtype bf16

Prints, as ours/diffusers ratios: transformer forward time (batch 1, and a CFG pair of batch 2 as
sampling runs it), timed with both sides in one process, calls alternating (``--rounds``), and
its peak memory from fresh processes; the whole pipeline (sampling with CFG, DDIM, then the VAE
decode; both sides' frames compared) and its split into the two; VAE decode time and peak memory
as the number of frames grows (diffusers with tiling and slicing on, ours chunked with its
defaults). Apart from the alternating forward, every run is a fresh process; the two sides
alternate (``--pairs`` rounds) and medians are reported, with the fastest run of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import interleaved, measure, ratio, run_worker, weights_once  # noqa: E402

SIZES = {
    # transformer, VAE channels, (frames, height, width) of the transformer/pipeline cases
    # 6 layers of a 5B-style model (RoPE), 864 video tokens + 226 text tokens
    "5b-style": dict(
        transformer=dict(num_layers=6, num_attention_heads=8, use_rotary_positional_embeddings=True),
        vae=dict(block_out_channels=(64, 128, 128, 256)),
        video=(9, 192, 384),
        vae_size=(128, 192),
    ),
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

    big = spec not in (SIZES["small"], SIZES["5b-style"])  # billions of parameters: materialise small random values directly
    with torch.device("meta") if big else torch.device("cpu"):
        tf = CogVideoXTransformer3DModel(**spec["transformer"])
    if big:
        tf = tf.to_empty(device="cpu")
        for p in tf.parameters():
            torch.nn.init.normal_(p, std=0.02)
    tf.save_pretrained(str(root / "transformer"), safe_serialization=True)
    del tf
    AutoencoderKLCogVideoX(**spec["vae"]).save_pretrained(str(root / "vae"), safe_serialization=True)


def saved_model(root: Path):
    """(our transformer config, the family, the VAE's pixels per latent cell) of the saved weights:
    what the latent and text shapes are asked of."""
    from vdit_core import families
    from vdit_core.checkpoint import read_json
    from vdit_core.models.cogvideox import CogVideoXConfig
    from vdit_core.vae.cogvideox_vae import CogVideoXVAEConfig

    config = CogVideoXConfig.from_diffusers(read_json(root / "transformer" / "config.json"))
    return config, families.get("cogvideox"), CogVideoXVAEConfig.from_diffusers(read_json(root / "vae" / "config.json")).spatial_compression


def latent_shape(root: Path, batch: int, frames: int, height: int, width: int, padded: bool = True) -> tuple[int, ...]:
    """[B, C, T, h, w] latents of a video of this size for the saved model, as its family says
    (``padded``: the latent frames the transformer takes, else the VAE's)."""
    config, family, scale = saved_model(root)
    t = family.latent_frames(config, frames)[1 if padded else 0]
    return batch, family.latent_channels(config), t, height // scale, width // scale


def _inputs(args, torch, cfg_dim):
    frames, h, w = SIZES[args.size]["video"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(latent_shape(Path(args.root), args.batch, frames, h, w), generator=g)
    ctx = torch.randn(args.batch, saved_model(Path(args.root))[0].max_text_seq_length, cfg_dim, generator=g)
    return x, ctx


def _load(impl: str, args, torch):
    """(model, latents x, text states ctx, "ours" or "ref") for one side of the comparison."""
    from diffusers import CogVideoXTransformer3DModel

    from vdit_core.models.cogvideox import load_transformer

    dtype, dev, root = getattr(torch, DTYPES[args.dtype]), args.device, Path(args.root)
    if impl in ("ours", "compiled"):
        model = load_transformer(root / "transformer", dtype=dtype, device=dev)
        if impl == "compiled":  # regional torch.compile; the untimed warm-up call compiles
            import warnings

            from vdit_core.pipeline import compile_blocks

            warnings.filterwarnings("ignore", message=".*complex operators.*")
            compile_blocks(model)
            impl = "ours"
    else:
        model = CogVideoXTransformer3DModel.from_pretrained(str(root / "transformer"), torch_dtype=dtype).to(dev).eval()
    x, ctx = _inputs(args, torch, model.config.text_embed_dim)
    return model, x.to(dev), ctx.to(dev, dtype), impl


def _forward_fn(model, impl: str, x, ctx, args, torch):
    """One transformer call of either side on the same inputs."""
    dev, dtype = args.device, ctx.dtype
    t = torch.full((args.batch,), 500.0, device=dev)
    if impl == "ours":
        return lambda: model(x, t, ctx)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = model.config
    rope = None
    if c.use_rotary_positional_embeddings:
        p = c.patch_size
        gh, gw = x.shape[3] // p, x.shape[4] // p
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
        rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), x.shape[2], device=dev)
    xr = x.permute(0, 2, 1, 3, 4).to(dtype)
    return lambda: model(hidden_states=xr, encoder_hidden_states=ctx, timestep=t.long(), image_rotary_emb=rope, return_dict=False)


def _alternate(args, torch) -> dict:
    """Both sides in one process, their calls alternating for ``--rounds`` rounds (which side goes
    first alternates too): the machine's drifts hit both alike. Median and fastest seconds of each."""
    fns = {}
    for impl in ("ours", "ref"):
        model, x, ctx, impl = _load(impl, args, torch)
        fns[impl] = _forward_fn(model, impl, x, ctx, args, torch)
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for r in range(args.rounds):
            for k in (("ours", "ref") if r % 2 else ("ref", "ours")):
                t0 = time.perf_counter()
                fns[k]()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return {f"{k}_{stat}": f(v) for k, v in times.items() for stat, f in (("s", lambda v: sorted(v)[len(v) // 2]), ("min", min))}


def worker(args) -> dict:
    import torch

    outputs = []
    dtype = getattr(torch, DTYPES[args.dtype])
    dev = args.device
    root = Path(args.root)
    kind, impl = args.worker.split(":")
    if kind == "alternate":
        return _alternate(args, torch)
    if kind in ("forward", "pipeline"):
        from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

        from vdit_core.families.cogvideox import release_schedule
        from vdit_core.pipeline import Pipeline as Ours
        from vdit_core.schedules import DiscreteSchedule

        model, x, ctx, impl = _load(impl, args, torch)
        if kind == "forward":
            with torch.no_grad():
                res = measure(_forward_fn(model, impl, x, ctx, args, torch), dev, repeat=args.repeat)
            return {"case": args.worker, **res}
        steps = args.steps
        frames, h, w = SIZES[args.size]["video"]
        if impl == "ours":
            from vdit_core.vae.cogvideox_vae import load_vae

            pipe = Ours(transformer=model, vae=load_vae(root / "vae", dtype=dtype, device=dev), text_encoder=None,
                        schedule=DiscreteSchedule.from_config(release_schedule(model.config)))
            cond, uncond = {"context": ctx}, {"context": torch.zeros_like(ctx)}

            def fn():
                t0 = time.perf_counter()
                latents = pipe.sample(cond, uncond, x, steps=steps, cfg=6.0, sampler="ddim", progress=False)
                split["sample_s"] = time.perf_counter() - t0
                return pipe.decode(latents)  # [F, H, W, 3] in [0, 1]
        else:
            from diffusers import AutoencoderKLCogVideoX

            sched = CogVideoXDDIMScheduler(snr_shift_scale=1.0 if model.config.use_rotary_positional_embeddings else 3.0,
                                           prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False)
            vae = AutoencoderKLCogVideoX.from_pretrained(str(root / "vae"), torch_dtype=dtype).to(dev).eval()
            pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            decode = vae.decode

            def timed_decode(*a, **k):  # the decode's share of the call
                t0 = time.perf_counter()
                out = decode(*a, **k)
                split["decode_s"] = time.perf_counter() - t0
                return out

            vae.decode = timed_decode

            def fn():
                out = pipe(prompt_embeds=ctx, negative_prompt_embeds=torch.zeros_like(ctx), num_frames=frames, height=h, width=w,
                           num_inference_steps=steps, guidance_scale=6.0, latents=x.permute(0, 2, 1, 3, 4).to(dtype), output_type="pt").frames
                return out[0].permute(0, 2, 3, 1)  # [F, H, W, 3] in [0, 1]
        split: dict[str, float] = {}
        with torch.no_grad():
            res = measure(lambda: outputs.append(fn()), dev, repeat=1, warmup=0)
        if impl == "ours":
            split["decode_s"] = res["s"] - split["sample_s"]
        else:
            split["sample_s"] = res["s"] - split["decode_s"]
        torch.save(outputs[-1].float().cpu(), root / f"frames_{impl}.pt")  # compared by the main process
        return {"case": args.worker, **res, **split}
    if kind == "vae":
        from diffusers import AutoencoderKLCogVideoX

        from vdit_core.vae.cogvideox_vae import load_vae

        frames = args.frames
        h, w = SIZES[args.size]["vae_size"]
        z = torch.randn(latent_shape(root, 1, frames, h, w, padded=False), generator=torch.Generator().manual_seed(0)).to(dev)
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
    p.add_argument("--size", default="5b-style", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3, help="interleaved fresh-process runs of each side per case")
    p.add_argument("--vae-frames", default="49,97")
    p.add_argument("--sections", default="forward,pipeline,vae")
    p.add_argument("--compile", action="store_true", help="also time the forward with compiled blocks (torch.compile)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)  # the forward's batch (2: a CFG pair)
    p.add_argument("--rounds", type=int, default=12, help="forward: alternating calls of each side in one process")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    root = setup(args.size)
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
              "--repeat", str(args.repeat), "--root", str(root)]
    frames, h, w = SIZES[args.size]["video"]
    print(f"CogVideoX {args.size} on {args.device} ({args.dtype}), {torch.get_num_threads()} threads; video {frames}x{h}x{w}; "
          f"ratios are ours/diffusers, medians of {args.pairs} interleaved fresh-process pairs")
    sections = args.sections.split(",")
    if "forward" in sections:
        impls = ("ours", "ref", "compiled") if args.compile else ("ours", "ref")
        for batch, label in ((1, "batch 1"), (2, "CFG pair, batch 2")):
            alt = run_worker(__file__, [*common, "--batch", str(batch), "--rounds", str(args.rounds), "--worker", "alternate:both"])
            runs = interleaved(__file__, [*common, "--batch", str(batch)], "forward:{}", impls, args.pairs)
            if isinstance(runs, str) or "error" in alt:
                print(f"transformer forward ({label}): {runs if isinstance(runs, str) else alt['error']}")
                continue
            o, r = runs["ours"], runs["ref"]
            print(f"transformer forward ({label}): in one process, {args.rounds} alternating rounds: ours {alt['ours_s']:.3f} s, "
                  f"diffusers {alt['ref_s']:.3f} s, time ratio {ratio(alt['ours_s'], alt['ref_s'])} (fastest calls "
                  f"{ratio(alt['ours_min'], alt['ref_min'])}); fresh processes: time ratio {ratio(o['s'], r['s'])}, "
                  f"peak {o['peak_mib']:.0f} vs {r['peak_mib']:.0f} MiB, ratio {ratio(o['peak_mib'], r['peak_mib'])}")
            if args.compile:
                c = runs["compiled"]
                print(f"  compiled blocks (torch.compile): {c['s']:.3f} s, {ratio(c['s'], o['s'])} of eager, {ratio(c['s'], r['s'])} of diffusers; "
                      f"peak {c['peak_mib']:.0f} MiB")
    if "pipeline" in sections:
        runs = interleaved(__file__, common, "pipeline:{}", ("ours", "ref"), args.pairs)
        if isinstance(runs, str):
            print(f"pipeline: {runs}")
        else:
            o, r = runs["ours"], runs["ref"]
            diff = (torch.load(root / "frames_ours.pt") - torch.load(root / "frames_ref.pt")).abs().max().item()
            print(f"whole pipeline ({args.steps} DDIM steps with CFG 6, then the VAE decode; frames differ by at most {diff:.1e}):")
            print(f"  median: ours {o['s']:.2f} s, diffusers {r['s']:.2f} s, time ratio {ratio(o['s'], r['s'])}")
            print(f"  fastest: ours {o['s_min']:.2f} s, diffusers {r['s_min']:.2f} s, ratio {ratio(o['s_min'], r['s_min'])}")
            print(f"  sampling: ours {o['sample_s']:.2f} s, diffusers {r['sample_s']:.2f} s, ratio {ratio(o['sample_s'], r['sample_s'])}; "
                  f"VAE decode: ours {o['decode_s']:.2f} s, diffusers {r['decode_s']:.2f} s, ratio {ratio(o['decode_s'], r['decode_s'])}")
            print(f"  peak: ours {o['peak_mib']:.0f} MiB, diffusers {r['peak_mib']:.0f} MiB, ratio {ratio(o['peak_mib'], r['peak_mib'])}")
    if "vae" in sections:
        vh, vw = SIZES[args.size]["vae_size"]
        print(f"VAE decode at {vh}x{vw} (diffusers: tiling + slicing on); medians of {args.pairs} fresh-process decodes each")
        print(f"{'frames':>7} {'ours s':>9} {'ref s':>9} {'time ratio':>11} {'ours MiB':>10} {'ref MiB':>10} {'mem ratio':>10}")
        base = None
        for f in [int(x) for x in args.vae_frames.split(",")]:
            runs = interleaved(__file__, [*common, "--frames", str(f)], "vae:{}", ("ours", "ref"), args.pairs)
            if isinstance(runs, str):
                print(f"{f:>7}: {runs}")
                continue
            o, r = runs["ours"], runs["ref"]
            base = base or o["peak_mib"]
            print(f"{f:>7} {o['s']:>9.2f} {r['s']:>9.2f} {ratio(o['s'], r['s']):>11} {o['peak_mib']:>10.0f} "
                  f"{r['peak_mib']:>10.0f} {ratio(o['peak_mib'], r['peak_mib']):>10}   (ours: {100 * (o['peak_mib'] / base - 1):+.0f}% on the first)")


if __name__ == "__main__":
    main()
