"""Rebuild the bundled demo model from a seed, with this project's code only.

    python -m vdit_core.demo.build --out demo_build --install

1. writes the dataset (moving shapes, held-out combinations excluded),
2. trains a sentencepiece tokenizer on the captions and initialises a small frozen T5 encoder,
3. trains the CogVideoX-architecture VAE (``vae_train.py``), then fine-tunes its decoder with the
   encoder frozen, weighting the shapes' outlines and corners,
4. initialises the CogVideoX-architecture transformer (RoPE variant) and trains it from scratch
   with ``python -m vdit_core.train --full`` (in process), then further with each clip also
   captioned without its colour or its motion (``shapes.write_partial_captions``),
5. evaluates colour/shape/motion accuracy on held-out and training prompts, and the VAE's PSNR,
6. with ``--install``, copies the finished model folder into ``vdit_core/demo/model``.

About 1.5 hours on 2 CPU cores; ``--quick`` runs every stage in minutes (for checking the build).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import save_diffusers_folder
from ..models.cogvideox import CogVideoXConfig, CogVideoXTransformer, save_transformer
from ..text import load_tokenizer
from ..vae.cogvideox_vae import load_vae
from .shapes import ALL_COMBOS, FPS, FRAMES, SIZE, held_out_combos, render, train_combos, write_dataset, write_partial_captions
from .vae_train import DEMO_VAE, finetune_decoder, reconstruction_psnr, train_vae

DEMO_TRANSFORMER = CogVideoXConfig(
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=DEMO_VAE.latent_channels,
    out_channels=DEMO_VAE.latent_channels,
    text_embed_dim=64,
    time_embed_dim=128,
    use_rotary_positional_embeddings=True,
    sample_height=SIZE // DEMO_VAE.spatial_compression,  # the latent size: follows the VAE's depth
    sample_width=SIZE // DEMO_VAE.spatial_compression,
    sample_frames=FRAMES,
    max_text_seq_length=16,
)
SCHEDULER = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def make_tokenizer(texts: list[str], out: Path, vocab_size: int = 96, max_length: int = DEMO_TRANSFORMER.max_text_seq_length) -> Path:
    """A T5-style sentencepiece tokenizer (pad 0, eos 1, unk 2) trained on ``texts``, laid out
    like the official CogVideoX tokenizer folder.

    BPE, not T5's unigram: on a corpus this small sentencepiece's unigram trainer stops at 32
    pieces, nearly single letters, so a caption took 22 tokens and the ends ("moving left") were
    cut at ``max_length``. BPE with 96 pieces keeps every caption word whole (5 tokens)."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "spiece"), vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
    )
    corpus.unlink()
    (out / "spiece.vocab").unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": max_length, "legacy": True})
    )
    tok = load_tokenizer(out)
    lengths = {t: len(tok(t).input_ids) for t in texts}  # each distinct text tokenized once
    longest = max(lengths, key=lengths.get)
    if lengths[longest] > max_length:  # a truncated caption would silently lose its last words
        raise RuntimeError(f"{out}: {longest!r} takes {lengths[longest]} tokens, more than max_length {max_length}")
    return out


def make_text_encoder(out: Path, vocab: int, seed: int) -> None:
    """A small T5 encoder with random weights (frozen: it is never trained)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=DEMO_TRANSFORMER.text_embed_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(cfg).save_pretrained(str(out), safe_serialization=True)


def store_fp16(path: Path) -> None:
    """Rewrite a safetensors file with its float tensors in fp16: the shipped demo stays under
    20 MB (fp32 weights are 20.1 MiB), and the loaders cast to the chosen dtype anyway."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:  # one read: the tensors and the header's metadata
        metadata = f.metadata()
        tensors = {}
        for k in f.keys():
            v = f.get_tensor(k)
            tensors[k] = v.half() if v.is_floating_point() else v
    save_file(tensors, str(path), metadata=metadata)


def save_vae(vae, folder: Path) -> None:
    """The VAE in the diffusers layout, switched into ``folder`` whole once written (a stage
    counts as done once its config exists)."""
    save_diffusers_folder(folder, vae.config.to_diffusers(), vae.state_dict())


def with_transformer(model: Path, transformer: Path, dest: Path) -> Path:
    """``dest``: a copy of the model folder ``model`` whose transformer is the folder
    ``transformer``, written beside it and renamed into place."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(transformer, tmp / "transformer")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def write_model_folder(root: Path, defaults: dict) -> None:
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {
        "_class_name": "CogVideoXPipeline",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        "_vdit_defaults": {"name": "vdit-demo", **defaults},  # the name pipelines and nodes show
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def load_clips(paths: list[Path]) -> torch.Tensor:
    from ..video_io import read_video

    return torch.stack([(read_video(p)[0] * 255).round().to(torch.uint8) for p in paths])


def build(out: Path, seed: int = 0, quick: bool = False, install: bool = False, log=print) -> dict:
    t_start = time.perf_counter()
    out = Path(out)
    model = out / "model"
    clips_per_combo = 2 if quick else 16
    # 1. data
    data = out / "data"
    if not (data / ".done").exists():
        shutil.rmtree(data, ignore_errors=True)
        paths = write_dataset(data, seed, clips_per_combo)
        (data / ".done").write_text(str(len(paths)))
    paths = sorted(data.glob("*.mp4"))
    log(f"[{time.perf_counter() - t_start:.0f} s] dataset: {len(paths)} clips of {len(train_combos(seed))} combinations; "
        f"held out: {', '.join(c.caption for c in held_out_combos(seed))}")
    # 2. text
    if not (model / "text_encoder" / "config.json").exists():  # finished stages are kept: resumable
        make_tokenizer([c.caption for c in ALL_COMBOS] * 4 + [""], model / "tokenizer")
        make_text_encoder(model / "text_encoder", len(load_tokenizer(model / "tokenizer")), seed)
    # 3. VAE: trained whole, then its decoder fine-tuned for the shapes' corners (encoder frozen)
    if not (model / "vae" / "config.json").exists():
        clips = load_clips(paths)
        base = out / "vae_base"  # the first pass, kept so that a resumed build redoes only the second
        if not (base / "config.json").exists():
            save_vae(train_vae(clips, DEMO_VAE, steps=60 if quick else 1500, seed=seed, log=log), base)
        vae = finetune_decoder(load_vae(base), clips, steps=4 if quick else 500, seed=seed, log=log)
        del clips
        save_vae(vae, model / "vae")
    vae = load_vae(model / "vae")
    rng = random.Random(seed + 1)
    held_clips = torch.stack([render(c, rng) for c in held_out_combos(seed) for _ in range(2)])
    vae_psnr = reconstruction_psnr(vae, held_clips)
    log(f"[{time.perf_counter() - t_start:.0f} s] VAE reconstruction PSNR on held-out clips: {vae_psnr:.2f} dB")
    # 4. transformer: fresh init, then the project's trainer
    if not (model / "transformer" / "config.json").exists():
        torch.manual_seed(seed)
        save_transformer(CogVideoXTransformer(DEMO_TRANSFORMER), model / "transformer")
    from .fit_preview import fit

    preview_rng = random.Random(seed + 2)
    preview_clips = torch.stack([render(c, preview_rng) for c in ALL_COMBOS for _ in range(4)])
    factors, bias, rms = fit(vae, preview_clips)  # the sampler's previews: latent -> RGB, fitted to this VAE
    log(f"preview factors fitted (RMS error {rms:.3f} on [-1, 1])")
    defaults = {"steps": 30, "cfg": 5.0, "latent_rgb": [factors, bias]}
    write_model_folder(model, defaults)
    steps = 40 if quick else 6000
    train_transformer(model, data, out / "train", steps, 3e-3, min(200, steps // 10), quick, seed)
    # 4b. the same transformer trained further with partial captions beside the whole ones
    first = out / "model_first"  # the model folder with the first pass's transformer: the second pass starts there
    if not (first / "transformer" / "config.json").exists():
        with_transformer(model, out / "train" / "transformer_ema", first)
    parts = write_partial_captions(data, out / "data_parts", seed).parent
    steps = 10 if quick else 1500
    train_transformer(first, parts, out / "train_parts", steps, 1e-3, steps // 15, quick, seed)
    final = with_transformer(model, out / "train_parts" / "transformer_ema", out / "final")
    for weights in final.glob("*/*.safetensors"):
        store_fp16(weights)
    # 5. evaluation
    report = evaluate_model(final, seed, quick, out / "eval", log)
    report.update({"vae_psnr_held_out_db": round(vae_psnr, 2), "build_seconds": round(time.perf_counter() - t_start)})
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(json.dumps(report, indent=2))
    if install:
        from . import MODEL_DIR

        shutil.rmtree(MODEL_DIR, ignore_errors=True)
        shutil.copytree(final, MODEL_DIR)
        size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
        log(f"installed the demo model in {MODEL_DIR} ({size / 2**20:.1f} MiB)")
    return report


def train_transformer(model: Path, data: Path, output: Path, steps: int, lr: float, warmup: int, quick: bool, seed: int) -> None:
    """A full finetune of ``model``'s transformer on ``data`` by the project's trainer (resumable)."""
    from ..train.trainer import main as train_main

    code = train_main([
        "--model", str(model), "--data", str(data), "--output", str(output), "--full",
        "--steps", str(steps), "--batch-size", "32", "--lr", str(lr), "--warmup-steps", str(warmup),
        "--lr-schedule", "cosine", "--weight-decay", "0.01", "--ema-decay", "0.999" if not quick else "0.9",
        "--no-gradient-checkpointing", "--checkpoint-every", str(max(steps // 4, 10)), "--keep-checkpoints", "1",
        "--caption-dropout", "0.1", "--seed", str(seed), "--resume",
    ])
    if code != 0:
        raise RuntimeError(f"training the demo transformer on {data} failed")


def evaluate_model(folder: Path, seed: int, quick: bool, video_dir: Path | None, log=print, seeds=None) -> dict:
    """Accuracy of colour, shape and motion on every held-out prompt and a set of training
    prompts, several seeds each; the evaluator reads the written videos back."""
    from ..pipeline import load_pipeline
    from .evaluate import evaluate

    pipe = load_pipeline(folder, device="cpu")
    seeds = seeds or ([0] if quick else [0, 1, 2, 3])
    held = held_out_combos(seed)
    trained = train_combos(seed)[:: max(1, len(train_combos(seed)) // 12)][:12]
    report = {}
    for label, combos in (("held_out", held), ("train", trained)):
        scores = evaluate(pipe, combos, seeds, out_dir=video_dir / label if video_dir else None)
        report[label] = {"videos": scores.n, **{k: round(v, 4) for k, v in scores.accuracy().items()}, "failures": scores.failures}
        log(f"{label} prompts: {scores.line()}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vdit_core.demo.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_build", help="work folder (resumable: finished stages are kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the build in minutes")
    p.add_argument("--install", action="store_true", help="copy the result into vdit_core/demo/model")
    args = p.parse_args(argv)
    build(Path(args.out), args.seed, args.quick, args.install)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build", "evaluate_model", "make_tokenizer", "DEMO_TRANSFORMER", "FPS"]
