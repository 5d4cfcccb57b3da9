"""A training step (forward + backward + AdamW) of vdit against the same step with the diffusers
model (PEFT for LoRA), same config, batch and inputs; printed as ours/diffusers ratios.

    python bench/train.py                                   # CPU, a small config
    python bench/train.py --size 2b --device cuda --dtype bf16 --mode lora
    python bench/train.py --size 5b --device cuda --dtype bf16 --mode lora

Gradient checkpointing is on for both; LoRA rank 64 on attention q/k/v/out (+ FFN for ours'
defaults is not used here: both adapt the same four attention projections). Each case runs in a
fresh process; peak memory as in ``_harness.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import measure, ratio, run_worker  # noqa: E402
from cogvideox import DTYPES, SIZES, latent_shape, saved_model, setup  # noqa: E402

TARGETS_OURS = r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"
TARGETS_PEFT = ["to_q", "to_k", "to_v", "to_out.0"]


def worker(args) -> dict:
    import torch

    from vdit_core.schedules import DiscreteSchedule
    from vdit_core.families.cogvideox import release_schedule

    dtype = getattr(torch, DTYPES[args.dtype])
    dev = args.device
    root = args.root
    frames, h, w = SIZES[args.size]["video"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(latent_shape(Path(root), args.batch, frames, h, w), generator=g).to(dev)
    text_length = saved_model(Path(root))[0].max_text_seq_length
    noise = torch.randn(x0.shape, generator=g).to(dev)
    impl = args.worker
    if impl == "ours":
        from vdit_core.lora import inject_lora
        from vdit_core.models.cogvideox import load_transformer
        from vdit_core.prediction import VPrediction

        base_dtype = dtype if args.mode == "lora" else torch.float32
        model = load_transformer(f"{root}/transformer", dtype=base_dtype, device=dev)
        model.gradient_checkpointing = True
        if args.mode == "lora":
            model.requires_grad_(False)
            lora = inject_lora(model, rank=args.rank, alpha=args.rank, targets=TARGETS_OURS)
            params = list(lora.parameters())
        else:
            params = list(model.parameters())
        schedule = DiscreteSchedule.from_config(release_schedule(model.config))
        ctx = torch.randn(args.batch, text_length, model.config.text_embed_dim, generator=g).to(dev)
        denoiser = VPrediction(lambda x, t, context: model(x, t, context).float(), schedule)

        def loss_fn(t):
            return denoiser.loss(x0, noise, schedule.sigma(t.double()).to(dev), context=ctx).mean()
    else:
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        base_dtype = dtype if args.mode == "lora" else torch.float32
        model = CogVideoXTransformer3DModel.from_pretrained(f"{root}/transformer", torch_dtype=base_dtype).to(dev)
        model.enable_gradient_checkpointing()
        model.train()
        if args.mode == "lora":
            import peft

            model.requires_grad_(False)
            model.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS_PEFT, init_lora_weights=True))
            params = [p for p in model.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()
        else:
            params = list(model.parameters())
        c = model.config
        rope = None
        if c.use_rotary_positional_embeddings:
            p = c.patch_size
            gh, gw = x0.shape[3] // p, x0.shape[4] // p
            crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
            rope = get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), x0.shape[2], device=dev)
        from vdit_core.models.cogvideox import CogVideoXConfig

        schedule = DiscreteSchedule.from_config(release_schedule(CogVideoXConfig.from_diffusers(dict(c))))
        ctx = torch.randn(args.batch, text_length, c.text_embed_dim, generator=g).to(dev)
        ac = schedule.alphas_cumprod.to(dev)

        def loss_fn(t):
            # the CogVideoX finetuning recipe: v-target through the scheduler's terms
            a = ac[t].float().view(-1, 1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            inp = x_t.permute(0, 2, 1, 3, 4).to(base_dtype)
            out = model(hidden_states=inp, encoder_hidden_states=ctx.to(base_dtype), timestep=t.to(dev), image_rotary_emb=rope, return_dict=False)[0]
            v = a.sqrt() * noise - (1 - a).sqrt() * x0
            return (out.float().permute(0, 2, 1, 3, 4) - v).pow(2).mean()

    opt = torch.optim.AdamW(params, lr=1e-5)
    use_amp = dtype != torch.float32
    steps = iter(range(10**6))

    def step():
        t = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(next(steps)))
        with torch.autocast(dev.split(":")[0], dtype=dtype, enabled=use_amp):
            loss = loss_fn(t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = measure(step, dev, repeat=args.repeat)
    return {"impl": impl, **res, "trainable": sum(p.numel() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--mode", default="lora,full")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    root = setup(args.size)
    frames, h, w = SIZES[args.size]["video"]
    print(f"training step, CogVideoX {args.size} on {args.device} ({args.dtype}), batch {args.batch}, {frames}x{h}x{w}, "
          f"gradient checkpointing; ratios ours/diffusers")
    for mode in args.mode.split(","):
        common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--mode", mode, "--rank", str(args.rank),
                  "--batch", str(args.batch), "--repeat", str(args.repeat), "--root", str(root)]
        ours = run_worker(__file__, [*common, "--worker", "ours"])
        ref = run_worker(__file__, [*common, "--worker", "ref"])
        if "error" in ours or "error" in ref:
            print(f"{mode}: failed: {ours.get('error') or ref.get('error')}")
            continue
        label = f"LoRA r{args.rank}" if mode == "lora" else "full"
        print(f"{label}: step ours {ours['s']:.3f} s, diffusers {ref['s']:.3f} s, time ratio {ratio(ours['s'], ref['s'])}; "
              f"peak {ours['peak_mib']:.0f} vs {ref['peak_mib']:.0f} MiB, ratio {ratio(ours['peak_mib'], ref['peak_mib'])}; "
              f"trainable {ours['trainable']:,} vs {ref['trainable']:,}")


if __name__ == "__main__":
    main()
