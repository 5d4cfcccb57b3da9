"""The speed and memory options against the plain run, in one run: seconds per sampling step and
peak memory, each case in a fresh process, on the same random weights and inputs.

    python bench/options.py                                  # CPU: 6 layers of a 5B-style CogVideoX
    python bench/options.py --size 5b --device cuda --dtype bf16 --gpu-blocks 10

Cases: plain; fp8 weights; step caching (threshold 0.1); regional torch.compile; block swap
(CUDA only); and, under torchrun with 2 processes (gloo on a CPU, NCCL on GPUs), the CFG branches
split over the two ranks and the sequence split over them. Memory is per process (rank 0's for the
2-process cases): the weights held on the device, and the sampling's peak above what was allocated
before it (CUDA: the allocator's; CPU: the peak RSS). Sampling only (CFG, DDIM); no VAE, no text
encoder: the conditioning is random.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import bench_args, measure, ratio, run_worker, weights_once  # noqa: E402
from cogvideox import DTYPES, SIZES, _make_weights  # noqa: E402

CASES = ["plain", "fp8", "step_cache", "compile", "block_swap", "cfg_split", "sequence"]
TWO_RANKS = ("cfg_split", "sequence")


def worker(args) -> dict:
    import torch

    from vdit_core import families, parallel
    from vdit_core.fp8 import quantize
    from vdit_core.offload import BlockSwap
    from vdit_core.pipeline import Pipeline, compile_blocks

    case = args.worker
    fam = families.get("cogvideox")
    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device
    if case in TWO_RANKS:
        device = str(parallel.init(args.device))
        torch.set_num_threads(max(1, torch.get_num_threads() // 2) if device == "cpu" else torch.get_num_threads())
    tf = fam.load_transformer(f"{args.root}/transformer", dtype=dtype, device="cpu")
    if case == "fp8":
        quantize(tf, fam.blocks(tf))
    if case == "block_swap":
        tf.block_swap = BlockSwap(tf, fam.blocks(tf), device, args.gpu_blocks)
    else:
        tf.to(device)
    if case == "compile":
        compile_blocks(tf, fam)
    pipe = Pipeline(transformer=tf, vae=None, text_encoder=None, family=fam, **fam.model_defaults(None, tf.config))
    if case in TWO_RANKS:
        parallel.enable(pipe, parallel.plan(guidance=True, split_cfg=case == "cfg_split"))
    frames, h, w = SIZES[args.size]["video"]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(pipe.latent_shape(frames, h, w), generator=g).to(device)
    text = (tf.config.max_text_seq_length, tf.config.text_embed_dim)
    cond = {"context": torch.randn(1, *text, generator=g).to(device, dtype)}
    uncond = {"context": torch.randn(1, *text, generator=g).to(device, dtype)}
    cache = 0.1 if case == "step_cache" else 0.0
    out = {}

    def fn():
        with torch.no_grad():
            out["x"] = pipe.sample(cond, uncond, noise, steps=args.steps, cfg=6.0, sampler="ddim", progress=False, step_cache=cache)

    on_device = [t for t in [*tf.parameters(), *tf.buffers()] if t.device.type == torch.device(device).type]
    weights = sum(t.numel() * t.element_size() for t in on_device)
    res = measure(fn, device, repeat=args.repeat, warmup=1)
    res["weights_mib"] = weights / 2**20
    res["s_per_step"] = res.pop("s") / args.steps
    if pipe.last_step_cache is not None:
        res["skipped"] = pipe.last_step_cache.skipped / (pipe.last_step_cache.skipped + pipe.last_step_cache.computed)
    res["latents"] = out["x"].float().cpu().flatten()[:4096].tolist()  # to compare with the plain run
    if case in TWO_RANKS:
        rank0 = parallel.is_main_rank()
        parallel.finish()
        if not rank0:
            return {}
    return res


def main() -> None:
    p = bench_args(__doc__, SIZES, DTYPES)
    p.set_defaults(size="5b-style", repeat=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gpu-blocks", type=int, default=2, help="block swap: blocks kept on the GPU")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    if args.worker:
        res = worker(args)
        if res:
            print(json.dumps(res))
        return
    import torch

    root = weights_once("cogvideox", args.size, SIZES[args.size], _make_weights)
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--repeat", str(args.repeat),
              "--steps", str(args.steps), "--gpu-blocks", str(args.gpu_blocks), "--root", str(root)]
    print(f"CogVideoX {args.size}, video {SIZES[args.size]['video']}, {args.steps} DDIM steps, CFG 6, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':>11} {'s/step':>8} {'vs plain':>9} {'weights MiB':>12} {'peak MiB':>9} {'vs plain':>9} {'max |latents - plain|':>22}")
    plain = None
    for case in args.cases.split(","):
        if case == "block_swap" and not args.device.startswith("cuda"):
            print(f"{case:>11}  (CUDA only: on a CPU there is nothing to swap to)")
            continue
        res = run_worker(__file__, [*common, "--worker", case],
                         ("-m", "torch.distributed.run", "--nproc_per_node", "2") if case in TWO_RANKS else ())
        if "error" in res:
            print(f"{case:>11}  failed: {res['error']}")
            continue
        if plain is None:
            plain = res
        diff = max(abs(a - b) for a, b in zip(res["latents"], plain["latents"]))
        extra = f"  ({res['skipped']:.0%} of calls skipped)" if "skipped" in res else ""
        print(f"{case:>11} {res['s_per_step']:>8.3f} {ratio(res['s_per_step'], plain['s_per_step']):>9} {res['weights_mib']:>12.0f} {res['peak_mib']:>9.0f} "
              f"{ratio(res['peak_mib'], plain['peak_mib']):>9} {diff:>22.2e}{extra}")


if __name__ == "__main__":
    main()
