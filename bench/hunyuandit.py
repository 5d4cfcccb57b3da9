"""HunyuanDiT side by side with diffusers: same weights (random, saved once as a diffusers folder),
same inputs, each case in a fresh process.

    python bench/hunyuandit.py                       # CPU: a small DiT at 512x512, minutes
    python bench/hunyuandit.py --size g2 --device cuda --dtype fp16 --height 1024 --width 1024

Prints ours/diffusers ratios of time and peak memory for the transformer forward (the CFG pair
in one batch, as both pipelines run it) and for the whole pipeline (text encoders, 5 DDIM steps
with CFG, VAE decode).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import bench_args, interleaved, measure, ratio, weights_once  # noqa: E402

SIZES = {
    # transformer, VAE channels, text encoder widths
    "small": dict(transformer=dict(num_attention_heads=6, attention_head_dim=64, hidden_size=384, num_layers=8, mlp_ratio=4.0,
                                   cross_attention_dim=256, cross_attention_dim_t5=256, pooled_projection_dim=256),
                  vae=(64, 128, 256, 256), bert=256, t5=256),
    "g2": dict(transformer=dict(num_attention_heads=16, attention_head_dim=88, hidden_size=1408, num_layers=40, mlp_ratio=4.3637,
                                cross_attention_dim=1024, cross_attention_dim_t5=2048, pooled_projection_dim=1024),
               vae=(128, 256, 512, 512), bert=1024, t5=2048),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROMPT, NEGATIVE = "a red circle on a blue square, watercolour", "blurry"


def setup(size: str) -> Path:
    """A HunyuanDiT diffusers folder of random weights for the size, saved once."""
    return weights_once("hunyuandit", size, SIZES[size], _make_weights)


def _make_weights(root: Path, spec: dict) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast, T5Config, T5EncoderModel

    from vdit_core.demo.build import make_tokenizer

    tf = HunyuanDiT2DModel(in_channels=4, patch_size=2, sample_size=64, text_len=77, text_len_t5=256,
                           use_style_cond_and_image_meta_size=False, **spec["transformer"])
    with torch.no_grad():
        for p in tf.parameters():
            p.normal_(0, 0.02)
    n = len(spec["vae"])
    vae = AutoencoderKL(block_out_channels=spec["vae"], layers_per_block=2, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, scaling_factor=0.13025)
    words = sorted(set(re.findall(r"\w+", PROMPT + " " + NEGATIVE)))
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    bert = BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=spec["bert"], num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=2 * spec["bert"]), add_pooling_layer=False)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=spec["t5"], d_kv=64, d_ff=2 * spec["t5"], num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    tok2 = AutoTokenizer.from_pretrained(str(make_tokenizer([PROMPT, NEGATIVE] * 20, root / "t5_tokenizer", vocab_size=40, max_length=256)))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.02, prediction_type="v_prediction",
                          clip_sample=False, steps_offset=1, timestep_spacing="leading")
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=BertTokenizerFast(vocab_file=str(root / "vocab.txt")), transformer=tf,
                              scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                              text_encoder_2=t5, tokenizer_2=tok2)
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)


def worker(args) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    dev, root = args.device, Path(args.root)
    kind, impl = args.worker.split(":")
    h, w = args.height, args.width
    if kind == "forward":
        from vdit_core import families
        from vdit_core.models.hunyuan_dit import HunyuanDiTConfig

        # the latent layout and text lengths as the family and the saved config state them
        c = HunyuanDiTConfig.from_diffusers(json.loads((root / "model" / "transformer" / "config.json").read_text()))
        family = families.get("hunyuandit")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, family.latent_channels(c), h // c.vae_scale, w // c.vae_scale, generator=g)
        bert = torch.randn(2, c.text_len, c.cross_attention_dim, generator=g)
        t5 = torch.randn(2, c.text_len_t5, c.cross_attention_dim_t5, generator=g)
        m1, m2 = torch.ones(2, c.text_len, dtype=torch.long), torch.ones(2, c.text_len_t5, dtype=torch.long)
        m1[:, 20:] = 0
        m2[:, 30:] = 0
        t = torch.tensor([500.0, 500.0])
        x, bert, t5, m1, m2, t = (v.to(dev) for v in (x, bert, t5, m1, m2, t))
        if impl == "ours":
            from vdit_core.models.hunyuan_dit import load_transformer

            model = load_transformer(root / "model" / "transformer", dtype=dtype, device=dev)
            xx = x[:, :, None].to(dtype)
            fn = lambda: model(xx, t, bert, m1, t5, m2)  # noqa: E731
        else:
            from diffusers import HunyuanDiT2DModel
            from diffusers.models.embeddings import get_2d_rotary_pos_embed
            from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

            model = HunyuanDiT2DModel.from_pretrained(str(root / "model" / "transformer"), torch_dtype=dtype).to(dev).eval()
            gh, gw = x.shape[2] // c.patch_size, x.shape[3] // c.patch_size
            rope = get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, get_resize_crop_region_for_grid((gh, gw), 32), (gh, gw), device=dev)
            xd, bd, td = x.to(dtype), bert.to(dtype), t5.to(dtype)
            fn = lambda: model(xd, t, encoder_hidden_states=bd, text_embedding_mask=m1, encoder_hidden_states_t5=td,  # noqa: E731
                               text_embedding_mask_t5=m2, image_rotary_emb=rope, return_dict=False)
        with torch.no_grad():
            res = measure(fn, dev, repeat=args.repeat)
        return {"case": args.worker, **res}
    if kind == "pipeline":
        if impl == "ours":
            from vdit_core.pipeline import load_pipeline

            pipe = load_pipeline(root / "model", device=dev, dtype=dtype)
            fn = lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=1, height=h, width=w, steps=args.steps,  # noqa: E731
                              cfg=6.0, sampler="ddim", seed=0, progress=False, check_memory=False)
        else:
            from diffusers import HunyuanDiTPipeline

            pipe = HunyuanDiTPipeline.from_pretrained(str(root / "model"), torch_dtype=dtype).to(dev)
            pipe.set_progress_bar_config(disable=True)
            fn = lambda: pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w, num_inference_steps=args.steps,  # noqa: E731
                              guidance_scale=6.0, generator=torch.Generator().manual_seed(0), use_resolution_binning=False, output_type="pt")
        with torch.no_grad():
            res = measure(fn, dev, repeat=1, warmup=1)
        return {"case": args.worker, **res}
    raise ValueError(args.worker)


def main() -> None:
    p = bench_args(__doc__, SIZES, DTYPES)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.set_defaults(repeat=5)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    root = setup(args.size)
    common = ["--size", args.size, "--device", args.device, "--dtype", args.dtype, "--height", str(args.height), "--width",
              str(args.width), "--steps", str(args.steps), "--repeat", str(args.repeat), "--root", str(root)]
    print(f"HunyuanDiT {args.size} on {args.device} ({args.dtype}) at {args.width}x{args.height}; ratios are ours/diffusers, "
          f"medians of {args.pairs} interleaved fresh-process pairs")
    for kind, label in (("forward", "transformer forward (CFG pair)"), ("pipeline", f"whole pipeline, {args.steps} DDIM steps with CFG")):
        runs = interleaved(__file__, common, kind + ":{}", ("ours", "ref"), args.pairs)
        if isinstance(runs, str):
            print(f"{label}: {runs}")
            return
        o_s, r_s, o_m, r_m = runs["ours"]["s"], runs["ref"]["s"], runs["ours"]["peak_mib"], runs["ref"]["peak_mib"]
        print(f"{label}: ours {o_s:.3f} s, diffusers {r_s:.3f} s, time ratio {ratio(o_s, r_s)}; "
              f"peak {o_m:.0f} vs {r_m:.0f} MiB, ratio {ratio(o_m, r_m)}")


if __name__ == "__main__":
    main()
