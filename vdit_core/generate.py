"""Command line text/image-to-video: ``python -m vdit_core.generate --prompt ... --out out.mp4``."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vdit_core.generate",
        description="Generate a video with a video diffusion transformer and write it as mp4.",
    )
    p.add_argument("--model", help="model folder (diffusers layout) or single-file checkpoint")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default="", help="what it should not show")
    p.add_argument("--frames", type=int, default=None, help="number of frames (4k+1)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=None, help="width in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", default=None, help="sampler name (see vdit_core.sampling.SAMPLERS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="first frame for image-to-video models")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output .mp4 path")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(f"vdit: no model pipeline is available yet to generate {args.out!r}")


if __name__ == "__main__":
    main()
