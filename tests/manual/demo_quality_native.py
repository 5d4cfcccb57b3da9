"""The demo's held-out accuracy through ComfyUI's own sampling (not collected by pytest: CI has no
ComfyUI). It runs the bundled demo workflow's nodes in process, the way the workflow wires them:
VDIT Load Model -> VDIT Prompt Encode -> VDIT Empty Latent Video -> ComfyUI's KSampler (the
workflow's sampler, scheduler, steps and cfg) -> VDIT Load VAE + ComfyUI's VAE Decode; each video is
written to mp4 and read back, then scored by vdit_core.demo.evaluate, as the CLI's evaluation is.

    VDIT_COMFYUI=/path/to/ComfyUI /path/to/comfy-venv/bin/python tests/manual/demo_quality_native.py --seeds 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds per held-out prompt (ComfyUI's KSampler seeds 0..N-1)")
    ap.add_argument("--training", action="store_true", help="also score the training combinations (one seed each)")
    args = ap.parse_args()
    sys.path[:0] = [os.environ["VDIT_COMFYUI"], str(ROOT / "tests"), str(ROOT)]  # ComfyUI, the test helpers, vdit_core
    import torch

    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import nodes as comfy_nodes
    from test_package import load_pack

    from vdit_core.demo.evaluate import Scores, analyse
    from vdit_core.demo.shapes import held_out_combos, train_combos
    from vdit_core.video_io import read_video, write_video

    pack = load_pack()
    n = pack.NODE_CLASS_MAPPINGS
    api = json.loads((ROOT / "workflows" / "api" / "vdit demo - text to video (no downloads).json").read_text())
    values = {v["class_type"]: v["inputs"] for v in api.values()}
    ks, lat = values["KSampler"], values["VDITEmptyLatentVideo"]
    demo = values["VDITLoadModel"]["model"]
    model = n["VDITLoadModel"]().load(demo, "default", "auto")[0]
    te = n["VDITTextEncoderLoader"]().load(demo, "default", 0)[0]
    vae = n["VDITLoadVAE"]().load(demo, "default", "auto")[0]
    encode = n["VDITPromptEncode"]()
    negative = encode.encode(te, "")[0]  # the workflow's negative prompt is empty
    latent = n["VDITEmptyLatentVideo"]().generate(model, lat["width"], lat["height"], lat["frames"], 1)[0]
    fps = values["CreateVideo"]["fps"]

    def score(combos, seeds, out: Path) -> Scores:
        scores = Scores()
        for combo in combos:
            positive = encode.encode(te, combo.caption)[0]
            for seed in seeds:
                with torch.no_grad():
                    samples = comfy_nodes.KSampler().sample(model, seed, ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"],
                                                            positive, negative, latent)[0]
                    frames = comfy_nodes.VAEDecode().decode(vae, samples)[0]
                path = write_video(out / f"{combo.shape}_{combo.colour}_{combo.motion}_{seed}.mp4", frames, fps=fps)
                scores.add(combo, analyse(read_video(path)[0]), seed)
        return scores

    with tempfile.TemporaryDirectory() as tmp:
        held = score(held_out_combos(), list(range(args.seeds)), Path(tmp))
        print(f"held out, through ComfyUI's KSampler ({ks['sampler_name']}, {ks['scheduler']}, {ks['steps']} steps, cfg {ks['cfg']}): {held.line()}")
        print(held.table())
        for f in held.failures:
            print("  miss:", f)
        if args.training:
            print("training:", score(train_combos(), [0], Path(tmp)).line())


if __name__ == "__main__":
    main()
