"""The bundled demo: the data generator, the evaluator, and the shipped weights."""

from __future__ import annotations

import random
import time

import pytest
import torch

from report import REPORT
from vdit_core.demo import MODEL_DIR
from vdit_core.demo.evaluate import Scores, analyse
from vdit_core.demo.shapes import ALL_COMBOS, COLOURS, MOTIONS, SHAPES, Combo, held_out_combos, render, train_combos, write_dataset
from vdit_core.video_io import read_video, write_video


def test_held_out_combinations_are_new_compositions_of_trained_parts():
    held, trained = held_out_combos(0), train_combos(0)
    assert len(held) >= 8 and not set(held) & set(trained) and len(held) + len(trained) == len(ALL_COMBOS) == 72
    for c in held:  # every part of a held-out prompt is seen in training, in other combinations
        assert any(t.shape == c.shape for t in trained)
        assert any(t.colour == c.colour for t in trained)
        assert any(t.motion == c.motion for t in trained)
    assert held_out_combos(0) == held_out_combos(0) and held_out_combos(1) != held


def test_evaluator_scores_ground_truth_clips_perfectly(tmp_path):
    rng = random.Random(7)
    scores = Scores()
    for i, combo in enumerate(ALL_COMBOS):
        for k in range(2):
            frames = render(combo, rng)
            if i % 9 == 0 and k == 0:  # and after a round trip through an mp4 file
                frames, _ = read_video(write_video(tmp_path / f"{i}.mp4", frames, fps=8))
            scores.add(combo, analyse(frames), k)
    assert scores.accuracy() == {"colour": 1.0, "shape": 1.0, "motion": 1.0}, scores.failures
    blank = torch.full((17, 64, 64, 3), 0.06)
    assert analyse(blank).colour is None  # nothing moving: nothing claimed


def test_evaluator_holds_for_blurred_shapes():
    """Generated videos are softer than the generator's; a Gaussian blur of sigma 2 px (far
    more than the shipped VAE's loss of detail) must not change any verdict."""
    import torch.nn.functional as F

    r = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(r**2) / 8)
    g = g / g.sum()
    rng = random.Random(11)
    scores = Scores()
    for combo in ALL_COMBOS:
        x = render(combo, rng).permute(0, 3, 1, 2).reshape(-1, 1, 64, 64)
        x = F.conv2d(F.conv2d(F.pad(x, (5, 5, 5, 5), mode="replicate"), g.view(1, 1, 1, 11)), g.view(1, 1, 11, 1))
        scores.add(combo, analyse(x.reshape(17, 3, 64, 64).permute(0, 2, 3, 1)), 0)
    assert scores.accuracy() == {"colour": 1.0, "shape": 1.0, "motion": 1.0}, scores.failures


def test_dataset_writer(tmp_path):
    paths = write_dataset(tmp_path, seed=0, clips_per_combo=1, combos=ALL_COMBOS[:3])
    assert len(paths) == 3
    frames, fps = read_video(paths[0])
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    assert paths[0].with_suffix(".txt").read_text() == ALL_COMBOS[0].caption
    assert len(SHAPES) == 3 and len(COLOURS) == 6 and len(MOTIONS) == 4


def test_partial_captions_list_each_clip_with_its_caption_and_one_without_an_attribute(tmp_path):
    from vdit_core.demo.shapes import write_partial_captions
    from vdit_core.train.data import Report, scan

    paths = write_dataset(tmp_path / "data", seed=0, clips_per_combo=2, combos=ALL_COMBOS[:3])
    meta = write_partial_captions(tmp_path / "data", tmp_path / "parts", seed=0)
    samples = scan(meta.parent, Report())  # as the trainer reads it
    assert len(samples) == 2 * len(paths)
    for clip, (whole, part) in zip(paths, zip(samples[::2], samples[1::2])):
        combo = next(c for c in ALL_COMBOS if c.caption == clip.with_suffix(".txt").read_text())
        assert whole.path.resolve() == part.path.resolve() == clip.resolve()
        assert whole.caption == combo.caption and part.caption in combo.partial_captions
    assert Combo("square", "green", "down").partial_captions == ("a square moving down", "a green square")


def test_shape_weights_mark_the_corners_of_squares_and_triangles_not_circles():
    from vdit_core.demo.vae_train import shape_weights

    rng = random.Random(3)
    corners = {}
    for shape in SHAPES:
        video = render(Combo(shape, "green", "down"), rng).permute(3, 0, 1, 2)[None] * 2 - 1
        mask, outline, corner = shape_weights(video)
        assert mask.shape == outline.shape == corner.shape == (1, 1, 17, 64, 64)
        assert 250 < mask.sum() / 17 < 450 or shape == "triangle"
        near = torch.nn.functional.max_pool3d(outline, (1, 5, 5), 1, (0, 2, 2))
        assert float((corner * (1 - near)).sum()) == 0  # corners lie within 2 px of the outline band
        corners[shape] = float(corner.sum() / 17)  # per frame
    assert corners["circle"] < 2 and corners["square"] > 60 and corners["triangle"] > 60, corners


def test_decoder_finetune_keeps_the_encoder_and_moves_the_decoder():
    from vdit_core.demo.vae_train import DEMO_VAE, finetune_decoder
    from vdit_core.vae.cogvideox_vae import CogVideoXVAE

    torch.manual_seed(0)
    vae = CogVideoXVAE(DEMO_VAE).eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    rng = random.Random(5)
    clips = torch.stack([(render(c, rng) * 255).round().to(torch.uint8) for c in ALL_COMBOS[:3]])
    tuned = finetune_decoder(vae, clips, steps=2, batch=2, log=lambda *_: None)
    after = tuned.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder."))
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not any(p.requires_grad for p in tuned.parameters())


shipped = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="demo model not built")


@shipped
def test_shipped_weights_are_small_and_load_through_the_real_loaders():
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    REPORT["demo model size (MiB)"] = round(size / 2**20, 2)
    assert size < 20 * 2**20
    from vdit_core.pipeline import load_pipeline

    pipe = load_pipeline(MODEL_DIR)  # the bundled demo
    assert pipe.config.use_rotary_positional_embeddings and pipe.name == "vdit-demo"
    assert pipe.default_size == (17, 64, 64)



@shipped
def test_shipped_tokenizer_keeps_every_caption_word_whole():
    """A caption longer than the model's text length would lose its last words (the motion)."""
    from vdit_core.text import load_tokenizer

    tok = load_tokenizer(MODEL_DIR / "tokenizer")
    for combo in ALL_COMBOS:
        ids = tok(combo.caption).input_ids
        assert len(ids) == len(combo.caption.split()) + 1, (combo.caption, tok.tokenize(combo.caption))  # + eos
    assert len(ids) <= tok.model_max_length


def test_tokenizer_without_protobuf_names_protobuf():
    """transformers cannot read a spiece.model without protobuf; its own error names tiktoken."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['google.protobuf'] = None\n"  # as if protobuf were not installed
            "from vdit_core.text import load_tokenizer\n"
            f"load_tokenizer({str(MODEL_DIR / 'tokenizer')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs the protobuf package" in r.stderr and "spiece.model" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def held_out_scores(tmp_path_factory):
    """A fixed subset: every held-out prompt with seed 0, read back from mp4 files."""
    from vdit_core.demo.evaluate import evaluate
    from vdit_core.pipeline import load_pipeline

    pipe = load_pipeline(MODEL_DIR, device="cpu")
    t0 = time.perf_counter()
    scores = evaluate(pipe, held_out_combos(0), [0], out_dir=tmp_path_factory.mktemp("held_out"))
    REPORT["demo held-out accuracy (seed 0, 10 prompts)"] = scores.line()
    REPORT["demo seconds per video (CPU)"] = round((time.perf_counter() - t0) / scores.n, 2)
    return scores


@shipped
def test_shipped_weights_meet_the_colour_and_motion_goal(held_out_scores):
    acc = held_out_scores.accuracy()
    assert acc["colour"] >= 0.9 and acc["motion"] >= 0.9, held_out_scores.failures


@shipped
def test_shipped_weights_meet_the_shape_goal(held_out_scores):
    """Every held-out square, circle and triangle reads as asked, with room to spare: the shipped
    weights' smallest margin over 100 held-out videos is 0.046 (fp32 or bf16, 1 or 2 threads)."""
    assert held_out_scores.accuracy()["shape"] == 1.0, held_out_scores.failures
    assert held_out_scores.margin()["min"] > 0.02, held_out_scores.margins


@shipped
def test_generate_cli_uses_the_demo_by_default(tmp_path, capsys):
    from vdit_core.generate import main

    t0 = time.perf_counter()
    assert main(["--prompt", "a blue square moving up", "--out", str(tmp_path / "demo.mp4")]) == 0
    REPORT["demo generate CLI seconds (CPU, in-process)"] = round(time.perf_counter() - t0, 1)
    frames, fps = read_video(tmp_path / "demo.mp4")
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    a = analyse(frames)
    assert (a.colour, a.motion) == ("blue", "up")  # the shape: see test_shipped_weights_meet_the_shape_goal


@shipped
def test_sampler_previews_show_the_prompts_colour_and_place():
    """The node's preview of the last step (the shipped latent -> RGB factors, fitted to the demo VAE
    by vdit_core.demo.fit_preview): the shape stands out from the background in the prompt's colour."""
    from test_package import load_pack

    from vdit_core.pipeline import load_pipeline

    preview = __import__(f"{load_pack().__name__}.nodes.sampling", fromlist=["x"])._preview
    pipe = load_pipeline(MODEL_DIR, device="cpu")
    assert pipe.latent_rgb is not None and len(pipe.latent_rgb[0]) == 2
    for prompt, check in (("a red circle moving right", lambda r, g, b: r > g and r > b),
                          ("a blue square moving up", lambda r, g, b: b > r and b > g),
                          ("a yellow circle moving down", lambda r, g, b: r > b and g > b)):
        last = {}
        pipe(prompt=prompt, seed=0, progress=False, callback=lambda info: last.update(x=info["denoised"]))
        img = torch.from_numpy(__import__("numpy").array(preview(last["x"], 8, pipe.latent_rgb))).float().reshape(-1, 3)  # [H*W, 3]
        brightness = img.sum(1)
        shape = img[brightness > brightness.mean() + brightness.std()]
        background = img[brightness <= brightness.median()]
        assert len(shape) >= 128 and shape.sum(1).mean() > 2 * background.sum(1).mean(), prompt
        assert check(*shape.mean(0).tolist()), (prompt, shape.mean(0).tolist())
