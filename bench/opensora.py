"""Open-Sora 1.2 side by side with the official v1.2.0 modules: same random weights (saved once in
the released layout), same inputs, each case in a fresh process.

    python bench/opensora.py                                   # ours only (CPU, a small model)
    python bench/opensora.py --official-refs PATH/official_refs.py
    python bench/opensora.py --size release --device cuda --dtype bf16 --official-refs ...

The official code needs colossalai, apex and xformers; ``--official-refs`` names a module with
``import_opensora()`` that imports the v1.2.0 modules with stand-ins for those (the team's
``shared/tools/official_refs.py``); without it only our figures are printed.

Prints ours/official ratios of time and peak memory for the transformer forward (the CFG pair in
one batch, 51 frames) and the VAE decode (51 frames), then our decode's peak memory at 51, 102
and 204 frames (flat: the VAE decodes one 17-frame chunk at a time).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import bench_args, interleaved, measure, ratio, run_worker, weights_once  # noqa: E402

SIZES = {
    "small": dict(transformer=dict(hidden_size=384, depth=4, num_heads=6, caption_channels=256),
                  spatial=(32, 64, 128, 128), temporal=dict(filters=32, num_res_blocks=2, channel_multipliers=(1, 2, 2, 4))),
    "release": dict(transformer=dict(hidden_size=1152, depth=28, num_heads=16, caption_channels=4096),
                    spatial=(128, 256, 512, 512), temporal=dict(filters=128, num_res_blocks=4, channel_multipliers=(1, 2, 2, 4))),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def setup(size: str) -> Path:
    """Random STDiT3 and VAE weights for the size, in the released layout, saved once."""
    return weights_once("opensora", size, SIZES[size], _make_weights)


def _make_weights(root: Path, spec: dict) -> None:
    import torch

    from vdit_core.models import opensora as model
    from vdit_core.vae import kl2d
    from vdit_core.vae import opensora_vae as vae

    tf = model.STDiT3(model.STDiT3Config(**spec["transformer"]))
    for p in tf.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    model.save_transformer(tf, root / "transformer")
    t_cfg = vae.TemporalVAEConfig(**spec["temporal"])
    s_cfg = kl2d.KL2DConfig(block_out_channels=spec["spatial"], scaling_factor=vae.SPATIAL_SCALE)
    v = vae.OpenSoraVAE(vae.OpenSoraVAEConfig(spatial=s_cfg, temporal=t_cfg))
    with torch.no_grad():
        for name, p in v.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02)
    from safetensors.torch import save_file

    (root / "vae").mkdir(exist_ok=True)
    save_file({k: t.contiguous() for k, t in v.state_dict().items()}, str(root / "vae" / "model.safetensors"))
    temporal = {"type": "VAE_Temporal", **{k: (list(x) if isinstance(x, tuple) else x) for k, x in t_cfg.__dict__.items()}}
    (root / "vae" / "config.json").write_text(json.dumps({"model_type": "VideoAutoencoderPipeline", "micro_frame_size": 17,
                                                          "vae_2d": {"type": "VideoAutoencoderKL"}, "vae_temporal": temporal,
                                                          "shift": list(v.config.shift), "scale": list(v.config.scale)}))
    # the spatial stage as a diffusers folder, for the official VideoAutoencoderKL's from_pretrained
    n = len(spec["spatial"])
    (root / "vae_2d").mkdir(exist_ok=True)
    (root / "vae_2d" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(spec["spatial"]), "layers_per_block": 2,
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512}))
    save_file({k[len("spatial_vae.module."):]: t.contiguous() for k, t in v.state_dict().items() if k.startswith("spatial_vae.module.")},
              str(root / "vae_2d" / "diffusion_pytorch_model.safetensors"))


def _official(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_refs", path)
    refs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refs)
    stubs = str(refs.write_stubs())  # its xformers stand-in before any installed (CUDA-only) xformers
    sys.path.insert(0, stubs)
    import xformers.ops  # noqa: F401

    sys.path.remove(stubs)
    return refs.import_opensora()


def _official_models(args, root: Path, dtype, kind: str):
    from safetensors.torch import load_file

    ns = _official(args.official_refs)
    if kind == "forward":
        cfg = json.loads((root / "transformer" / "config.json").read_text())
        keep = ("hidden_size", "depth", "num_heads", "mlp_ratio", "in_channels", "patch_size", "pred_sigma", "caption_channels",
                "model_max_length", "qk_norm", "input_sq_size")
        m = ns.STDiT3(ns.STDiT3Config(**{k: cfg[k] for k in keep}, enable_flash_attn=False, enable_layernorm_kernel=False))
        m.load_state_dict(load_file(str(root / "transformer" / "model.safetensors")), strict=True)
    else:
        raw = json.loads((root / "vae" / "config.json").read_text())
        temporal = {k: (tuple(x) if isinstance(x, list) else x) for k, x in raw["vae_temporal"].items()}
        m = ns.VideoAutoencoderPipeline(ns.VideoAutoencoderPipelineConfig(
            vae_2d=dict(type="VideoAutoencoderKL", from_pretrained=str(root / "vae_2d"), micro_batch_size=4), vae_temporal=temporal,
            micro_frame_size=17, shift=tuple(raw["shift"]), scale=tuple(raw["scale"])))
        m.load_state_dict(load_file(str(root / "vae" / "model.safetensors")), strict=True)
    return m.to(args.device, dtype).eval()


def worker(args) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    dev, root = args.device, Path(args.root)
    kind, impl = args.worker.split(":")[:2]
    from vdit_core import families
    from vdit_core.models.opensora import STDiT3Config

    # the latent layout, text length and size conditioning as the family states them for these weights
    family, config = families.get("opensora"), STDiT3Config.from_json(json.loads((root / "transformer" / "config.json").read_text()))
    scale = family.sampling_defaults(None, config)["vae_scale"]
    h, w = args.height // scale, args.width // scale
    g = torch.Generator().manual_seed(0)
    if kind == "forward":
        shape = (2, family.latent_channels(config), family.latent_frames(config, args.frames)[1], h, w)
        x = torch.randn(shape, generator=g).to(dev, dtype)
        y = torch.randn(2, config.model_max_length, config.caption_channels, generator=g).to(dev, dtype)
        mask = torch.zeros(2, config.model_max_length, dtype=torch.long, device=dev)
        mask[:, :40] = 1
        t = torch.tensor([700.0, 700.0], device=dev)
        size = {k: v.to(dev) for k, v in family.sample_conditioning(config, shape, scale).items()}  # fps 24 and the pixel size
        if impl == "ours":
            from vdit_core.models.opensora import load_transformer

            model = load_transformer(root / "transformer", dtype=dtype, device=dev)
            fn = lambda: model(x, t, y, mask=mask, **size)  # noqa: E731
        else:
            model = _official_models(args, root, dtype, kind)
            fn = lambda: model(x, t, y[:, None], mask=mask, **size)  # noqa: E731
        with torch.no_grad():
            res = measure(fn, dev, repeat=args.repeat)
        return {"case": args.worker, **res}
    if kind == "decode":
        frames = int(args.worker.split(":")[2])
        z = torch.randn(1, family.latent_channels(config), family.latent_frames(config, frames)[0], h, w, generator=g).to(dev, dtype)
        if impl == "ours":
            from vdit_core.vae.opensora_vae import load_vae

            vae = load_vae(root / "vae", dtype=dtype, device=dev)
            fn = lambda: vae.decode(z, chunk_frames=4, output_device="cpu")  # noqa: E731
        else:
            vae = _official_models(args, root, dtype, kind)
            fn = lambda: vae.decode(z, num_frames=frames).cpu()  # noqa: E731
        with torch.no_grad():
            res = measure(fn, dev, repeat=1, warmup=1)
        res["output_mib"] = frames * 3 * args.height * args.width * 4 / 2**20
        return {"case": args.worker, **res}
    raise ValueError(args.worker)


def main() -> None:
    p = bench_args(__doc__, SIZES, DTYPES)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=424)
    p.add_argument("--frames", type=int, default=51)
    p.add_argument("--official-refs", default=None, help="a module with import_opensora() (the official v1.2.0 modules)")
    p.add_argument("--decode-frames", default="51,102,204", help="frame counts of the decode-memory sweep (ours)")
    p.add_argument("--cases", default="forward,decode,sweep", help="which of forward, decode, sweep to run")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    root = setup(args.size)
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--height", str(args.height), "--width",
              str(args.width), "--frames", str(args.frames), "--repeat", str(args.repeat), "--root", str(root)]
    if args.official_refs:
        common += ["--official-refs", args.official_refs]
    impls = ("ours", "ref") if args.official_refs else ("ours",)
    print(f"Open-Sora {args.size} on {args.device} ({args.dtype}) at {args.width}x{args.height}; ratios are ours/official, "
          f"medians of {args.pairs} interleaved fresh-process runs")

    cases = args.cases.split(",")
    for case, label in (("forward:{}", f"transformer forward (CFG pair, {args.frames} frames)"),
                        (f"decode:{{}}:{args.frames}", f"VAE decode ({args.frames} frames)")):
        if case.split(":")[0] not in cases:
            continue
        runs = interleaved(__file__, common, case, impls, args.pairs)
        if isinstance(runs, str):
            print(f"{label}: {runs}")
            return
        o_s, o_m = runs["ours"]["s"], runs["ours"]["peak_mib"]
        if "ref" in runs:
            r_s, r_m = runs["ref"]["s"], runs["ref"]["peak_mib"]
            print(f"{label}: ours {o_s:.3f} s, official {r_s:.3f} s, time ratio {ratio(o_s, r_s)}; "
                  f"peak {o_m:.0f} vs {r_m:.0f} MiB, ratio {ratio(o_m, r_m)}")
        else:
            print(f"{label}: ours {o_s:.3f} s, peak {o_m:.0f} MiB")
    if "sweep" not in cases:
        return
    print("decode peak memory by length (ours; the output frames themselves listed apart):")
    for frames in (int(f) for f in args.decode_frames.split(",")):
        res = run_worker(__file__, [*common, "--worker", f"decode:ours:{frames}"])
        if "error" in res:
            print(f"  {frames} frames: failed: {res['error']}")
            continue
        extra = ""
        if args.official_refs:
            ref = run_worker(__file__, [*common, "--worker", f"decode:ref:{frames}"])
            extra = f"; official {ref['peak_mib']:.0f} MiB" if "error" not in ref else f"; official failed: {ref['error']}"
        print(f"  {frames} frames: {res['s']:.2f} s, peak {res['peak_mib']:.0f} MiB (output {res['output_mib']:.0f} MiB, "
              f"working set {res['peak_mib'] - res['output_mib']:.0f} MiB){extra}")


if __name__ == "__main__":
    main()
