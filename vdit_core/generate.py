"""Command line text/image-to-video (and, for image models, text/image-to-image).

    python -m vdit_core.generate --prompt "a blue square moving up" --out demo.mp4
    python -m vdit_core.generate --model path/to/CogVideoX-5b --prompt "..." --dtype bf16 --out out.mp4
    python -m vdit_core.generate --model path/to/HunyuanDiT-v1.2-Diffusers --prompt "..." --frames 1 --out x.png

Without ``--model`` the bundled demo model is used. Writes a video at the model's frame rate, or
a PNG/JPEG when ``--out`` names one (one frame).

Several GPUs (or CPU processes) for one video: ``torchrun --nproc_per_node N -m vdit_core.generate
...`` splits the CFG branches and the token sequence over the ranks (:mod:`vdit_core.parallel`);
rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _resolutions() -> list[str]:
    """Every family's trained sizes as WxH, then the releases' size names."""
    from .families import FAMILIES

    return list(dict.fromkeys([f"{w}x{h}" for f in FAMILIES.values() for w, h in f.resolutions]
                              + [n for f in FAMILIES.values() for n in f.named_resolutions]))


def _durations() -> list[str]:
    from .families import FAMILIES

    return [f"{n} ({k} frames)" for f in FAMILIES.values() for n, k in f.durations.items()]


def build_parser() -> argparse.ArgumentParser:
    from .families import FAMILIES, quote  # each family's facts, as its releases state them

    p = argparse.ArgumentParser(
        prog="python -m vdit_core.generate",
        description="Generate a video with a video diffusion transformer and write it as mp4.",
    )
    p.add_argument("--model", help="model folder (CogVideoX: the diffusers layout); default: the bundled demo model")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default="", help="what it should not show")
    p.add_argument("--frames", type=int, default=None, help=f"number of frames, a count the model takes ({quote('frame_rule')}); default: the model's ({quote('frames')})")
    p.add_argument("--duration", default=None, help="a release's named length (sets --frames): " + ", ".join(_durations()))
    p.add_argument("--resolution", default=None, metavar="WxH|NAME",
                   help="a size a release was trained at (sets --width and --height): " + ", ".join(_resolutions()) + " (a name alone, e.g. 240p, is its 16:9)")
    p.add_argument("--height", type=int, default=None, help=f"height in pixels, a multiple of the model's size step ({quote('size_multiple')}); default: the model's")
    p.add_argument("--width", type=int, default=None, help=f"width in pixels, a multiple of the model's size step ({quote('size_multiple')}); default: the model's")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: the model folder's, else its release's: {quote('steps')})")
    p.add_argument("--cfg", type=float, default=None, help=f"classifier-free guidance scale (default: the model folder's, else its release's: {quote('cfg')})")
    p.add_argument("--sampler", default=None,
                   help=f"sampler (default: the model folder's scheduler, else its release's: {quote('sampler')}); see vdit_core.sampling.SAMPLERS")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic CFG schedule (recommended with cogvideox_dpm)")
    p.add_argument("--step-cache", type=float, default=0.0, metavar="T",
                   help="skip the transformer on steps whose input changed by less than T in total (faster, slightly different; 0: off, 0.08-0.1: mild)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="first frame for image-to-video models; the input image for image-to-image (with --denoise)")
    p.add_argument("--video", default=None, help="an input video: video-to-video with --denoise below 1; with denoise 1, " + ", ".join(f"{f.label} continues it (the new clip starts with its last {f.extension_frames} frames)" for f in FAMILIES.values() if f.extends_videos))
    p.add_argument("--denoise", type=float, default=1.0, help="below 1: image-to-image from --image (image models) or video-to-video from --video, keeping that much of the run")
    p.add_argument("--fps", type=float, default=None, help=f"frames per second of the output (and Open-Sora's fps conditioning); default: the model's ({quote('fps')})")
    p.add_argument("--aesthetic-score", default=None, help=f"Open-Sora: the aesthetic score appended to the prompt (default {FAMILIES['opensora'].prompt_defaults['aesthetic_score']:g}; 'none' to leave it out)")
    p.add_argument("--motion-score", type=float, default=None, help="Open-Sora: a motion score appended to the prompt (off by default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight dtype")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--attention", default=None, help="attention backend: auto, sdpa, xformers, flash_attn, sageattention")
    p.add_argument("--fp8", action="store_true", help="store the transformer blocks' linear weights in float8 (about half the memory of bf16; computed in --dtype)")
    p.add_argument("--gpu-blocks", type=int, default=None, metavar="N",
                   help="block swap: keep N transformer blocks on the GPU and stream the others from CPU memory as they run (0: stream all; unset: the whole model on the GPU)")
    p.add_argument("--compile", action="store_true", help="compile each transformer block with torch.compile (the first step waits for it)")
    p.add_argument("--no-cfg-split", action="store_true",
                   help="under torchrun: keep both CFG branches on every rank and split only the sequence (by default an even number of ranks splits the branches first)")
    p.add_argument("--out", required=True, help="output path: a video (.mp4, .webm, .gif, .webp) or, for one frame, an image (.png, .jpg)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (without it an existing file is never touched)")
    p.add_argument("--no-memory-check", action="store_true", help="run even when the request looks larger than the free memory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import parallel

    if not parallel.launched():
        return _run(args, None)
    try:
        return _run(args, parallel)
    finally:
        parallel.finish()


def _run(args: argparse.Namespace, parallel) -> int:
    """One generation; ``parallel`` (the module) when torchrun started several processes."""
    from .attention import AttentionBackendError
    from .checkpoint import CheckpointError
    from .demo import demo_model_path
    from .pipeline import check_request, load_pipeline
    from .families import for_folder, parse_duration, parse_resolution
    from .video_io import WRITABLE_IMAGE_SUFFIXES, check_video_path, read_image, read_video, write_output

    try:
        t0 = time.perf_counter()
        if args.resolution:
            args.width, args.height = parse_resolution(args.resolution)
        if args.duration:
            args.frames = parse_duration(args.duration.split(" (")[0])
        if args.fps is not None and not (args.fps > 0):
            raise ValueError(f"--fps {args.fps}: must be a positive number (e.g. 24)")
        options = {}
        if args.aesthetic_score is not None:
            options["aesthetic_score"] = None if args.aesthetic_score.lower() == "none" else _number("--aesthetic-score", args.aesthetic_score)
        if args.motion_score is not None:
            options["motion_score"] = args.motion_score
        # everything a user typed is checked before the model loads: minutes of work never end in a refusal
        check_request(args.frames, args.height, args.width, args.steps, args.cfg, args.denoise, args.step_cache)
        check_video_path(args.out, overwrite=args.overwrite)
        if Path(args.out).suffix.lower() in WRITABLE_IMAGE_SUFFIXES and args.frames not in (None, 1):
            raise ValueError(f"{args.out}: an image holds one frame; --frames is {args.frames} (use .mp4, or --frames 1)")
        image = read_image(args.image) if args.image else None
        video = read_video(args.video)[0] if args.video else None
        model = args.model or demo_model_path()  # no --model: the bundled demo
        for_folder(model).check_options(options)  # before the model loads
        device, split, main = args.device, None, True
        if parallel is not None:  # every rank joins, and the split is settled (and refused) before loading
            device = parallel.init(args.device)
            split = parallel.plan(guidance=args.cfg is None or args.cfg > 1, split_cfg=not args.no_cfg_split,
                                  heads=parallel.configured_heads(model))
            main = split.is_main
        pipe = load_pipeline(model, device=device, dtype=args.dtype, attention=args.attention, compile=args.compile, fp8=args.fp8,
                             gpu_blocks=args.gpu_blocks)
        if split is not None:
            parallel.enable(pipe, split)
            if main:
                print(f"parallel: {split.describe()}", flush=True)
        latents = pipe(
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
            video=video,
            dynamic_cfg=args.dynamic_cfg,
            step_cache=args.step_cache,
            denoise=args.denoise,
            check_memory=not args.no_memory_check,
            fps=args.fps,
            progress=main,
            decode=False,
            **options,
        )
        if not main:  # every rank ends with the same latents; rank 0 decodes and writes them
            return 0
        frames = pipe.decode(latents, progress=True)
        fps = args.fps or pipe.fps
        path = write_output(args.out, frames, fps=fps)
    except (ValueError, CheckpointError, FileNotFoundError, AttentionBackendError) as e:
        if parallel is None or parallel.is_main_rank():  # the ranks ran the same checks: one says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    f, h, w, _ = frames.shape
    what = f"a {w}x{h} image" if path.suffix.lower() in WRITABLE_IMAGE_SUFFIXES else f"{f} frames, {w}x{h}, {fps:g} fps"
    print(f"wrote {path} ({what}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a number (e.g. 6.5) or none") from None


if __name__ == "__main__":
    sys.exit(main())
