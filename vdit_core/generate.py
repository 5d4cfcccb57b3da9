"""Command line text/image-to-video.

    python -m vdit_core.generate --prompt "a blue square moving up" --out demo.mp4
    python -m vdit_core.generate --model path/to/CogVideoX-5b --prompt "..." --dtype bf16 --out out.mp4

Without ``--model`` the bundled demo model is used. Writes an mp4 at the model's frame rate.
"""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vdit_core.generate",
        description="Generate a video with a video diffusion transformer and write it as mp4.",
    )
    p.add_argument("--model", help="model folder (CogVideoX: the diffusers layout); default: the bundled demo model")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default="", help="what it should not show")
    p.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="height in pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of 16")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's scheduler); see vdit_core.sampling.SAMPLERS")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic CFG schedule (recommended with cogvideox_dpm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="first frame for image-to-video models")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attention", default=None, help="attention backend: auto, sdpa, xformers, flash_attn, sageattention")
    p.add_argument("--out", required=True, help="output video path (.mp4, .webm, .gif, .webp)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (without it an existing file is never touched)")
    p.add_argument("--no-memory-check", action="store_true", help="run even when the request looks larger than the free memory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .attention import AttentionBackendError
    from .checkpoint import CheckpointError
    from .demo import demo_model_path
    from .pipeline import check_request, load_pipeline
    from .video_io import check_video_path, read_image, write_video

    try:
        t0 = time.perf_counter()
        # everything a user typed is checked before the model loads: minutes of work never end in a refusal
        check_request(args.frames, args.height, args.width, args.steps, args.cfg)
        check_video_path(args.out, overwrite=args.overwrite)
        image = read_image(args.image) if args.image else None
        model = args.model or demo_model_path()  # no --model: the bundled demo
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype, attention=args.attention)
        frames = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            steps=args.steps,
            cfg=args.cfg,
            sampler=args.sampler,
            seed=args.seed,
            image=image,
            dynamic_cfg=args.dynamic_cfg,
            check_memory=not args.no_memory_check,
        )
        path = write_video(args.out, frames, fps=pipe.fps)
    except (ValueError, CheckpointError, FileNotFoundError, AttentionBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    f, h, w, _ = frames.shape
    print(f"wrote {path} ({f} frames, {w}x{h}, {pipe.fps} fps) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
