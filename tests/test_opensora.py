"""Open-Sora 1.2 against the official v1.2.0 code: tiny random weights and the official outputs
saved as fixtures (tests/fixtures/opensora, made by its make_fixture.py; see the README), plus
the pipeline, nodes, CLI and trainer on a folder in the released layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny  # noqa: E402
from vdit_core import families  # noqa: E402
from vdit_core.checkpoint import CheckpointError  # noqa: E402
from vdit_core.models import opensora as model  # noqa: E402
from vdit_core.pipeline import Pipeline, load_pipeline  # noqa: E402
from vdit_core.schedules import FlowSchedule  # noqa: E402
from vdit_core.vae import opensora_vae as vae_mod  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "opensora"
FAMILY = families.get("opensora")


@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURE / "reference_io.safetensors")


@pytest.fixture(scope="module")
def transformer():
    return model.load_transformer(FIXTURE / "transformer")


@pytest.fixture(scope="module")
def vae():
    return vae_mod.load_vae(FIXTURE / "vae")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The released layout: transformer/ and vae/ (the fixture's), text_encoder/ + tokenizer/ (a
    tiny T5 with the test tokenizer); no model_index.json."""
    root = tmp_path_factory.mktemp("opensora")
    out = root / "models" / "vdit" / "opensora"
    shutil.copytree(FIXTURE / "transformer", out / "transformer")
    shutil.copytree(FIXTURE / "vae", out / "vae")
    tiny.tiny_t5().save_pretrained(out / "text_encoder")
    shutil.copytree(tiny.tokenizer_dir(str(root)), out / "tokenizer")
    return out


# ----------------------------------------------------------------------------------------------
# parity with the official code


def _stdit3_cases(ref, transformer, dtype=torch.float32) -> dict:
    """The fixture's four calls (reference_io.json meta.transformer_calls), float inputs in ``dtype``."""
    f = {k: ref[k].to(dtype) for k in ("tf_x", "tf_timestep", "tf_y", "tf_fps", "tf_height", "tf_width",
                                       "tf_iv_x", "tf_iv_timestep", "tf_iv_y", "tf_iv_fps", "tf_iv_height", "tf_iv_width")}
    size = dict(fps=f["tf_fps"], height=f["tf_height"], width=f["tf_width"])
    x, t, y, mask = f["tf_x"], f["tf_timestep"], f["tf_y"], ref["tf_mask"].long()
    return {
        "i": transformer(x, t, y, mask=mask, **size),
        "ii": transformer(x, t, y, mask=mask, x_mask=ref["tf_x_mask"].bool(), **size),
        "iii": transformer(x, t, y, mask=None, **size),
        "iv": transformer(f["tf_iv_x"], f["tf_iv_timestep"], f["tf_iv_y"], mask=ref["tf_iv_mask"].long(), fps=f["tf_iv_fps"],
                          height=f["tf_iv_height"], width=f["tf_iv_width"]),  # one frame, odd latent size (patch padding)
    }


@pytest.fixture
def fixture_sinusoids(monkeypatch):
    """The timestep / fps sinusoids with the float32 frequency table of the CPU that made tf_out64_*
    (sinusoid_table.safetensors). Official and ours compute that table with float32 exp, whose last
    bit differs between CPUs' vector libraries: on an AMD EPYC (AVX2) 3 of its 128 entries (12, 13,
    44) are 1 ulp from the Intel AVX-512 table, 1.6e-5 at the output. The table was recovered from
    tf_out64_* itself: those 3 one-ulp changes take our float64 model from 1.6e-5 to 3.2e-7 of it."""
    table = load_file(FIXTURE / "sinusoid_table.safetensors")["sinusoid_freqs"]
    original = model.timestep_embedding

    def embedding(t, dim, flip_sin_to_cos=True, shift=0.0, max_period=10000.0):
        if (dim, shift, max_period) != (2 * table.numel(), 0.0, 10000.0):
            return original(t, dim, flip_sin_to_cos, shift, max_period)
        args = t.float()[:, None] * table.to(t.device)[None]
        emb = torch.cat([args.sin(), args.cos()], dim=-1)
        return torch.cat([emb[:, table.numel():], emb[:, :table.numel()]], dim=-1) if flip_sin_to_cos else emb

    monkeypatch.setattr(model, "timestep_embedding", embedding)


@torch.no_grad()
def test_transformer_matches_the_official_stdit3(ref, transformer, fixture_sinusoids):
    # against the official model run in float64 (tf_out64_*, make_float64_outputs.py): the float32 tf_out_*
    # carry the rounding of the CPU that made them (1.6e-5 from float64). The float32 sinusoid table that
    # stays machine-bound is the fixture machine's here (fixture_sinusoids)
    cases = _stdit3_cases(ref, transformer)
    for name, out in cases.items():
        expected = ref[f"tf_out64_{name}"]
        assert expected.dtype == torch.float64
        assert out.shape == expected.shape and (out.double() - expected).abs().max() < 1e-5, name
    assert (cases["i"] - cases["ii"]).abs().max() > 0.1  # the conditioning-frame path is exercised
    # ours in float64 too (3e-7 measured): what is left is the float32 rounding of the output and of the steps
    # each code computes in float32 whatever the dtype (the official self-attention softmax, our RoPE rotation)
    for name, out in _stdit3_cases(ref, model.load_transformer(FIXTURE / "transformer", dtype=torch.float64), torch.float64).items():
        assert (out.double() - ref[f"tf_out64_{name}"]).abs().max() < 1e-6, name
    x, t, y, mask = ref["tf_x"], ref["tf_timestep"], ref["tf_y"], ref["tf_mask"].long()
    size = dict(fps=ref["tf_fps"], height=ref["tf_height"], width=ref["tf_width"])
    # the learned null caption: drop_text replaces y by y_embedding (the official uncond branch)
    null = transformer.y_embedder.y_embedding[None].expand(2, -1, -1)
    assert torch.equal(transformer(x, t, y[:, 0], mask=mask, drop_text=torch.tensor([True, True]), **size),
                       transformer(x, t, null, mask=mask, **size))


@torch.no_grad()
def test_vae_matches_the_official_two_stage_vae(ref, vae):
    video = ref["vae_video"]
    for n in (34, 9, 1):  # two whole chunks, a partial chunk, an image
        z = vae.encode(video[:, :, :n])
        assert (z - ref[f"vae_latents_{n}"]).abs().max() < 1e-5, n
        x = vae.decode(ref[f"vae_latents_{n}"])  # the frame count follows from the latents
        assert x.shape[2] == n and (x - ref[f"vae_decoded_{n}"]).abs().max() < 5e-5, n
    assert vae.config.temporal.num_res_blocks == 2 and vae.config.temporal.channel_multipliers == (1, 1, 2, 2)
    assert vae.config.temporal.num_groups == 8  # spelled out in config.json (the release: 32)
    # a partial last chunk of 3 latent frames holds 9 to 12 frames: the release decodes what it is told
    assert vae.decode(ref["vae_latents_9"], num_frames=12).shape[2] == 12
    with pytest.raises(ValueError, match="num_frames=33: latents of 10 frames hold 34 frames"):
        vae.decode(ref["vae_latents_34"], num_frames=33)


def test_timestep_transform_equals_the_official_float32_one(ref):
    meta = json.loads((FIXTURE / "reference_io.json").read_text())["meta"]["ts_table_axes"]
    table = ref["ts_table"]  # [resolution, num_frames, step]
    for a, (h, w) in enumerate(meta["res_HW"]):
        for b, frames in enumerate(meta["num_frames"]):
            ours = FAMILY_transform(30, frames, h, w)
            assert torch.equal((ours[:-1] * 1000).float(), table[a, b]), (h, w, frames)
    # 2-16 frames, where the official transform is NaN / zero: the latent frame count instead
    for frames in (5, 9, 13):
        s = FAMILY_transform(30, frames, 240, 424)
        assert torch.isfinite(s).all() and s[0] > 0.99 and torch.all(s.diff() < 0)
        n = vae_mod.latent_frames(frames)
        ratio = math.sqrt(240 * 424 / 512**2) * math.sqrt(n)
        assert float(s[15]) == pytest.approx(ratio * 0.5 / (1 + (ratio - 1) * 0.5), rel=1e-6)


def FAMILY_transform(steps, frames, h, w):
    from vdit_core.families.opensora import transform_sigmas

    return transform_sigmas(steps, frames, h, w)


@torch.no_grad()
@pytest.mark.parametrize("case", ["t2v", "t2i", "i2v", "ext"])
def test_sampling_matches_the_official_rflow_sampler(ref, transformer, vae, case):
    """The official RFLOW.sample (5 steps, CFG 7, the null caption with the prompt's mask, the
    i2v / extension mask strategies) from the same noise, then the VAE."""
    pipe = Pipeline(transformer, vae, None, FlowSchedule(), sampler="euler", steps=5, cfg=7.0, family=FAMILY)
    cond = {"y": ref["sample_y"][:, 0], "mask": ref["sample_mask"].long(), "drop_text": torch.tensor([False])}
    uncond = FAMILY.pair_conditioning(cond, {**cond, "y": torch.zeros_like(cond["y"]), "mask": torch.ones_like(cond["mask"]),
                                             "drop_text": torch.tensor([True])})[1]
    noise = ref[f"{case}_noise"]
    if case in ("i2v", "ext"):  # the reference latents the mask strategy wrote into z, held clean
        k = int((ref[f"{case}_x_mask_strategy"][0] == 0).sum())
        frames = FAMILY.frame_conditioning(transformer.config, ref[f"{case}_z_init"][:, :, :k], noise.shape[2])
        cond, uncond = {**cond, **frames}, {**uncond, **frames}
    assert torch.equal((pipe.sigmas(5, latent_shape=tuple(noise.shape))[:-1] * 1000).float(), ref[f"{case}_timesteps"])
    latents = pipe.sample(cond, uncond, noise, progress=False)
    assert (latents - ref[f"{case}_samples"]).abs().max() < 5e-5
    frames = vae.decode(latents)
    assert frames.shape == ref[f"{case}_frames"].shape and (frames - ref[f"{case}_frames"]).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# loading


def test_detection_wrappers_and_the_vae_config_forms(tmp_path, transformer, vae):
    sd = load_file(FIXTURE / "transformer" / "model.safetensors")
    assert families.for_file(FIXTURE / "transformer" / "model.safetensors", "transformer") is FAMILY
    assert families.for_file(FIXTURE / "vae" / "model.safetensors", "vae") is FAMILY
    for prefix in ("module.", "ema."):  # training checkpoints' wrappers; no config.json: read off the weights
        save_file({prefix + k: v for k, v in sd.items()}, tmp_path / f"{prefix}safetensors")
        loaded = model.load_transformer(tmp_path / f"{prefix}safetensors")
        assert loaded.config == transformer.config
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), transformer.state_dict().values()))
    torch.save({"model": {k: v for k, v in sd.items()}}, tmp_path / "ckpt.pt")  # a .pt: weights_only
    assert model.load_transformer(tmp_path / "ckpt.pt").config == transformer.config
    # the VAE's config.json naming the temporal VAE by its preset, as released: widths come from the weights
    released = tmp_path / "vae"
    shutil.copytree(FIXTURE / "vae", released)
    raw = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps({**raw, "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None}}))
    again = vae_mod.load_vae(released)
    assert again.config.temporal == vae.config.temporal  # (32 groups do not divide these tiny widths: their gcd)
    (released / "config.json").write_text(json.dumps({**raw, "vae_temporal": {"type": "VAE_Temporal_XL"}}))
    with pytest.raises(CheckpointError, match="VAE_Temporal_XL.*expected VAE_Temporal_SD"):
        vae_mod.load_vae(released)
    (released / "config.json").write_text(json.dumps({**raw, "vae_temporal": {**raw["vae_temporal"], "filters": 16}}))
    with pytest.raises(CheckpointError, match="filters=16 but the weights have 8"):
        vae_mod.load_vae(released)
    # the weight file alone: the release's chunking and normalisation
    assert vae_mod.load_vae(FIXTURE / "vae" / "model.safetensors").config.shift == vae.config.shift


def test_files_of_the_wrong_kind_say_what_they_are(tmp_path):
    vsd = load_file(FIXTURE / "vae" / "model.safetensors")
    temporal_only = tmp_path / "temporal.safetensors"
    save_file({k: v for k, v in vsd.items() if not k.startswith("spatial_vae.")}, temporal_only)
    with pytest.raises(CheckpointError, match="temporal VAE but not its spatial .SDXL. stage"):
        vae_mod.load_vae(temporal_only)
    with pytest.raises(CheckpointError, match="expected a CogVideoX transformer, but this looks like an Open-Sora 1.2 STDiT3 transformer"):
        families.get("cogvideox").load_transformer(FIXTURE / "transformer", torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="expected a HunyuanDiT transformer, but this looks like an Open-Sora 1.2 STDiT3 transformer"):
        families.get("hunyuandit").load_transformer(FIXTURE / "transformer" / "model.safetensors", torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="expected an Open-Sora STDiT3 transformer, but this looks like an Open-Sora 1.2 VAE"):
        model.load_transformer(FIXTURE / "vae")


# ----------------------------------------------------------------------------------------------
# the pipeline on the released folder layout


def test_the_pipeline_runs_the_released_layout(folder, ref):
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.family is FAMILY and pipe.sampler == "euler" and (pipe.steps, pipe.cfg, pipe.fps) == (30, 7.0, 24)
    kw = dict(prompt="a red circle moving right", num_frames=34, height=24, width=32, steps=3, seed=0, progress=False)
    frames = pipe(**kw)
    assert frames.shape == (34, 24, 32, 3) and torch.isfinite(frames).all()
    # the official prompt suffix by default; aesthetic_score=None leaves it out, and it changes the result
    y_default = pipe.encode_prompt("a red circle")
    y_plain = pipe.encode_prompt("a red circle", aesthetic_score=None)
    assert y_default["mask"].sum() > y_plain["mask"].sum()
    assert (pipe(**kw, aesthetic_score=None) - frames).abs().max() > 1e-4
    assert torch.equal(pipe.encode_prompt("a cat aesthetic score: 5.0.")["mask"], pipe.encode_prompt("a cat aesthetic score: 5.0.", aesthetic_score=None)["mask"])
    with pytest.raises(ValueError, match="cfg_rescale: not an option of Open-Sora models .*aesthetic_score, motion_score"):
        pipe(**kw, cfg_rescale=0.7)
    # fps is conditioning: another fps, another video; an image always gets 120
    assert (pipe(**kw, fps=12) - frames).abs().max() > 1e-4
    image = pipe(**{**kw, "num_frames": 1})
    assert image.shape == (1, 24, 32, 3) and torch.equal(image, pipe(**{**kw, "num_frames": 1}, fps=8))
    # a negative prompt replaces the learned null
    assert (pipe(**kw, negative_prompt="blurry") - frames).abs().max() > 1e-4
    # noise given explicitly reproduces the seeded run
    assert torch.equal(pipe(**kw, noise=pipe.noise_source(0, pipe.latent_shape(34, 24, 32))()), frames)


def test_image_to_video_and_video_extension(folder):
    pipe = load_pipeline(folder, device="cpu")
    kw = dict(prompt="a red circle", num_frames=34, height=24, width=32, steps=2, seed=1, progress=False)
    shape = pipe.latent_shape(34, 24, 32)
    decoded = []
    decode = pipe.decode
    pipe.decode = lambda latents, **k: decoded.append(latents) or decode(latents, **k)  # the sampled latents
    first = torch.rand(1, 24, 32, 3)
    video = pipe(**kw, image=first)
    assert video.shape == (34, 24, 32, 3) and (video - pipe(**kw)).abs().max() > 1e-3
    # the first latent frame is the image's (a posterior draw from the run's noise stream), held clean
    image_latents = pipe.encode_image(first, 24, 32, shape[2], pipe.noise_source(1, shape))["frame_latents"][:, :, :1]
    assert (decoded[0][:, :, :1] - image_latents).abs().max() < 1e-5
    # extension: the new clip starts with the video's last 17 frames (its last 5 latent frames), held clean
    clip = pipe(**kw, video=video)
    assert clip.shape == (34, 24, 32, 3)
    video_latents = pipe.encode_video(video, 24, 32, pipe.noise_source(1, shape))
    assert (decoded[-1][:, :, :5] - video_latents[:, :, -5:]).abs().max() < 1e-5
    assert (decoded[-1][:, :, 5:] - video_latents[:, :, 5:]).abs().max() > 0.1  # the rest is new
    with pytest.raises(ValueError, match="pass `image` .* or `video` .*not both"):
        pipe(**kw, image=first, video=video)
    # video-to-video with denoise < 1 still works
    assert pipe(**{**kw, "num_frames": None}, video=video, denoise=0.5).shape == (34, 24, 32, 3)


def test_bad_requests_are_refused_with_the_nearest_valid_values(folder):
    pipe = load_pipeline(folder, device="cpu")
    kw = dict(prompt="x", height=24, width=32, steps=2, progress=False)
    with pytest.raises(ValueError, match="num_frames=20: .*nearest valid: 18 or 22"):
        pipe(**kw, num_frames=20)
    with pytest.raises(ValueError, match="num_frames=2: .*nearest valid: 1 or 5"):
        pipe(**kw, num_frames=2)
    with pytest.raises(ValueError, match="width=30: must be a positive multiple of 8; nearest valid: 24 or 32"):
        pipe(**{**kw, "width": 30}, num_frames=17)
    with pytest.raises(ValueError, match="fps=0"):
        pipe(**kw, num_frames=17, fps=0)
    # other families refuse a video without denoise < 1, and images when they take none
    assert not families.get("cogvideox").extends_videos and FAMILY.takes_image(pipe.config)


def test_named_sizes_and_durations():
    assert families.parse_resolution("240p") == (424, 240) and families.parse_resolution("480p 9:16") == (480, 848)
    assert families.parse_resolution("720x480") == (720, 480) and families.parse_duration("4s") == 102
    with pytest.raises(ValueError, match="resolution '1080p'"):
        families.parse_resolution("1080p")
    assert "Open-Sora 240p 16:9 424x240" in families.resolution_choices()
    assert "Open-Sora 2s (51 frames)" in families.duration_choices()
    for name, frames in FAMILY.durations.items():
        assert FAMILY.size_problem(frames, 240, 424) is None, name
    for (w, h) in FAMILY.resolutions:
        assert FAMILY.size_problem(51, h, w) is None, (w, h)


def test_cli_generates_and_extends(folder, tmp_path, capsys):
    from vdit_core.generate import main
    from vdit_core.video_io import read_video

    out = tmp_path / "a.mp4"
    common = ["--model", str(folder), "--prompt", "a red circle", "--height", "24", "--width", "32", "--steps", "2"]
    assert main([*common, "--frames", "18", "--fps", "12", "--aesthetic-score", "none", "--out", str(out)]) == 0
    frames, fps = read_video(out)
    assert frames.shape[0] == 18 and fps == 12 and "18 frames, 32x24, 12 fps" in capsys.readouterr().out
    assert main([*common, "--video", str(out), "--frames", "34", "--out", str(tmp_path / "b.mp4")]) == 0
    assert read_video(tmp_path / "b.mp4")[0].shape[0] == 34
    assert main([*common, "--frames", "20", "--out", str(tmp_path / "c.mp4")]) == 2
    assert "nearest valid: 18 or 22" in capsys.readouterr().err and not (tmp_path / "c.mp4").exists()
    assert main([*common, "--duration", "2s", "--resolution", "nope", "--out", str(tmp_path / "d.mp4")]) == 2
    assert "resolution 'nope'" in capsys.readouterr().err
    # a prompt option of another family (the demo is CogVideoX-like) is refused before the model loads
    assert main(["--prompt", "x", "--aesthetic-score", "5", "--out", str(tmp_path / "e.mp4")]) == 2
    assert "aesthetic_score: not an option of CogVideoX models" in capsys.readouterr().err and not (tmp_path / "e.mp4").exists()


def test_the_nodes_serve_opensora(folder):
    from test_package import load_pack

    pack = load_pack()
    nodes, comfy = pack.NODE_CLASS_MAPPINGS, __import__(f"{pack.__name__}.nodes.comfy", fromlist=["x"])
    comfy.set_paths(models=folder.parents[1], output=folder.parents[1] / "output")
    assert "opensora/" in nodes["VDITModelLoader"].INPUT_TYPES()["required"]["model"][0]  # no model_index.json needed
    m = nodes["VDITModelLoader"]().load("opensora/", "default", "auto")[0]
    te = nodes["VDITTextEncoderLoader"]().load("opensora/", "default", 0)[0]
    v = nodes["VDITVAELoader"]().load("opensora/", "default", "auto")[0]
    pos = nodes["VDITTextEncode"]().encode(te, "a red circle moving right")[0]
    neg = nodes["VDITTextEncode"]().encode(te, "")[0]  # empty: the learned null caption
    latent = nodes["VDITEmptyLatent"]().generate(m, 32, 24, 1, 1, "custom", "Open-Sora 2s (51 frames)")[0]
    assert latent["samples"].shape == (1, 4, 15, 3, 4)
    with pytest.raises(ValueError, match="num_frames=20: Open-Sora's VAE .*nearest valid: 18 or 22"):  # the model's own rule when it runs
        nodes["VDITEmptyLatent"]().generate(m, 32, 24, 20, 1)
    latent = nodes["VDITEmptyLatent"]().generate(m, 32, 24, 34, 1)[0]
    out = nodes["VDITSampler"]().sample(m, pos, neg, latent, seed=3, steps=3, cfg=7.0, sampler="default", schedule="default", denoise=1.0)[0]
    frames = nodes["VDITVAEDecode"]().decode(v, out, 2, "auto", 0, 0)[0]
    expected = load_pipeline(folder, device="cpu")(prompt="a red circle moving right", num_frames=34, height=24, width=32, steps=3,
                                                   seed=3, progress=False)
    assert frames.shape == (34, 24, 32, 3) and (frames - expected).abs().max() < 1e-5
    # the same from single files (models/diffusion_models, models/vae, models/text_encoders): a T5 file serves
    # CogVideoX and Open-Sora, so the text encoder loader is told which
    models = folder.parents[1]
    for sub, src in (("diffusion_models", "transformer/model.safetensors"), ("vae", "vae/model.safetensors")):
        (models / sub).mkdir(exist_ok=True)
        shutil.copy(folder / src, models / sub / "opensora.safetensors")
    (models / "text_encoders").mkdir(exist_ok=True)
    shutil.copy(folder / "text_encoder" / "model.safetensors", models / "text_encoders" / "t5.safetensors")
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "tokenizer", dirs_exist_ok=True)
    m1 = nodes["VDITModelLoader"]().load("opensora.safetensors", "default", "auto")[0]
    v1 = nodes["VDITVAELoader"]().load("opensora.safetensors", "default", "auto")[0]
    te_cog = nodes["VDITTextEncoderLoader"]().load("t5.safetensors", "default", 0)[0]  # a lone T5 file: CogVideoX's by default
    with pytest.raises(ValueError, match="positive: encoded for CogVideoX, but the model is Open-Sora: set the text encoder loader's family to opensora"):
        nodes["VDITSampler"]().sample(m1, nodes["VDITTextEncode"]().encode(te_cog, "x")[0], neg, latent, seed=3, steps=3, cfg=7.0,
                                      sampler="default", schedule="default", denoise=1.0)
    with pytest.raises(ValueError, match="t5.safetensors: a T5 text encoder, not a text encoder HunyuanDiT uses"):
        nodes["VDITTextEncoderLoader"]().load("t5.safetensors", "default", 0, "hunyuandit")
    te1 = nodes["VDITTextEncoderLoader"]().load("t5.safetensors", "default", 0, "opensora")[0]
    pos1 = nodes["VDITTextEncode"]().encode(te1, "a red circle moving right")[0]
    neg1 = nodes["VDITTextEncode"]().encode(te1, "")[0]
    out1 = nodes["VDITSampler"]().sample(m1, pos1, neg1, latent, seed=3, steps=3, cfg=7.0, sampler="default", schedule="default", denoise=1.0)[0]
    assert (nodes["VDITVAEDecode"]().decode(v1, out1, 2, "auto", 0, 0)[0] - expected).abs().max() < 1e-5
    # image-to-video: the encoded first frame to image_latent
    first = nodes["VDITVAEEncode"]().encode(v, torch.rand(1, 24, 32, 3), 8, "auto", 0, 0)[0]
    i2v = nodes["VDITSampler"]().sample(m, pos, neg, latent, seed=3, steps=3, cfg=7.0, sampler="default", schedule="default", denoise=1.0,
                                        image_latent=first)[0]
    assert torch.equal(i2v["samples"][:, :, :1], first["samples"])


def test_lora_and_full_training_with_images_and_videos(folder, tmp_path):
    from PIL import Image
    from test_train import make_data

    from vdit_core.train.trainer import main

    data = make_data(tmp_path / "data", 2)  # 9-frame clips
    for i, colour in enumerate([(230, 30, 30), (30, 30, 230)]):  # images in the same data set: their own bucket
        Image.new("RGB", (32, 24), colour).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a plain colour")
    common = ["--model", str(folder), "--data", str(data), "--buckets", "24x32", "--frame-buckets", "1,9", "--frames", "9",
              "--height", "24", "--width", "32", "--cache-dir", str(tmp_path / "cache"), "--steps", "4",
              "--validation-prompt", "a red circle", "--validation-steps", "2"]
    assert main([*common, "--output", str(tmp_path / "lora"), "--lora-rank", "4", "--lr", "1e-2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "lora" / "losses.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert all(0 < t < 1000 and t != int(t) for r in records for ts in r["t"] for t in ts)  # continuous logit-normal timesteps
    pipe = load_pipeline(folder, device="cpu")
    kw = dict(prompt="a red circle", num_frames=9, height=24, width=32, steps=2, seed=0, progress=False)
    base = pipe(**kw)
    pipe.load_lora(tmp_path / "lora" / "lora.safetensors")
    assert (pipe(**kw) - base).abs().max() > 1e-4
    assert main([*common, "--output", str(tmp_path / "full"), "--full", "--lr", "1e-4"]) == 0
    tuned = model.load_transformer(tmp_path / "full" / "transformer")
    assert (tmp_path / "full" / "transformer" / "model.safetensors").exists()  # the released layout
    assert tuned.config == pipe.transformer.config


def test_caption_dropout_uses_the_learned_null_with_the_captions_mask(folder):
    pipe = load_pipeline(folder, device="cpu")
    cond = pipe.encode_prompt("a red circle")
    empty = pipe.encode_prompt("")
    assert FAMILY.caption_groups == (("drop_text",),) and bool(empty["drop_text"].all()) and not bool(cond["drop_text"].any())
    dropped = {**cond, **{k: empty[k] for k in FAMILY.caption_groups[0]}}
    x = torch.randn(1, 4, 2, 3, 4)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = pipe.transformer(x, t, **dropped, fps=24.0)
        b = pipe.transformer(x, t, pipe.transformer.y_embedder.y_embedding[None], mask=cond["mask"], fps=24.0)
    assert torch.equal(a, b)
