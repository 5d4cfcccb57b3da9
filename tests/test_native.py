"""vdit models as ComfyUI's own model objects (nodes/native.py), run by ComfyUI's real code: its
samplers, schedulers, CFG, model sampling, latent formats and VAE class.

ComfyUI is not a PyPI package, so these tests run where a ComfyUI checkout is named by
``VDIT_COMFYUI`` (its repository root) and its dependencies are importable, e.g. in ComfyUI's
own venv with pytest added::

    VDIT_COMFYUI=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_native.py

Elsewhere they are skipped. What ComfyUI's sampling gives here is also saved as fixtures
(``tests/fixtures/native``, written with ``VDIT_WRITE_FIXTURES=1``), and
``test_native_fixtures.py`` checks vdit_core's pipeline against them on every machine.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("VDIT_COMFYUI")
if not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file():
    pytest.skip("VDIT_COMFYUI does not name a ComfyUI checkout", allow_module_level=True)
sys.path.insert(0, COMFY)

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True  # ComfyUI's --cpu
import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import native_cases  # noqa: E402
from test_package import load_pack  # noqa: E402
from vdit_core.pipeline import Pipeline, frames_conditioning  # noqa: E402

PACK = load_pack()
native = __import__(f"{PACK.__name__}.nodes.native", fromlist=["x"])


def comfy_sample(patcher, case, sampler="euler", scheduler="simple"):
    """ComfyUI's KSampler path (comfy.sample.sample) on the case's noise and conditioning:
    raw latents out, as the KSampler node returns them."""
    family = patcher.model.vdit_family
    positive = native.conditioning(family, case.cond)
    negative = native.conditioning(family, case.uncond)
    if case.frame_latents is not None:  # what VDIT Image To Video adds to both
        frames = frames_conditioning(family, case.transformer.config, case.frame_latents, case.noise.shape[2])
        positive, negative = native.with_inputs(positive, frames), native.with_inputs(negative, frames)
    latent = torch.zeros_like(case.noise)
    return comfy.sample.sample(patcher, case.noise, case.steps, case.cfg, sampler, scheduler, positive, negative, latent,
                               seed=0, disable_pbar=True)


def comfy_sigmas(patcher, case, scheduler="simple") -> torch.Tensor:
    """The sigmas a KSampler run uses: the scheduler's, then the model's OUTER_SAMPLE shift."""
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, case.steps)
    if isinstance(patcher.get_model_object("model_sampling"), native.Flow):
        shift = patcher.model.vdit_family.sigma_shift(tuple(case.noise.shape), patcher.model.vdit_spatial_scale)
        sigmas = native.time_shift(sigmas.double(), shift).float()
    return sigmas


def vdit_sample(case, sigmas: torch.Tensor) -> torch.Tensor:
    """vdit_core's pipeline on the same noise, conditioning and sigmas: model-space latents."""
    defaults = {k: v for k, v in case.defaults.items() if k != "latent_rgb"}
    pipe = Pipeline(transformer=case.transformer, vae=None, text_encoder=None, family=case.family, **defaults)
    request = pipe.prepare(cond=case.cond, uncond=case.uncond, noise=case.noise, latents=case.noise, steps=case.steps,
                           cfg=case.cfg, sampler="euler", frame_latents=case.frame_latents)
    with torch.no_grad():
        return pipe.run(dataclasses.replace(request, sigmas=sigmas.double()), progress=False)


@pytest.mark.parametrize("name", native_cases.NAMES)
def test_ksampler_matches_the_pipeline(name):
    """ComfyUI's KSampler (euler, simple scheduler, CFG) through the native model gives vdit_core's
    pipeline's latents on the same noise, conditioning and sigmas, within 1e-4 of the latents'
    scale. (ComfyUI keeps the sampler's state in float32 at sigmas up to ~4519 for zero-terminal-SNR
    models: about 1e-4 of rounding; the pipeline's float32 run is 3e-6 from its float64 one.)"""
    case = native_cases.case(name)
    patcher = native.native_model(case.transformer, case.family, None, name, case.defaults)
    with torch.no_grad():
        raw = comfy_sample(patcher, case)
    sigmas = comfy_sigmas(patcher, case)
    ours = vdit_sample(case, sigmas)
    theirs = patcher.model.process_latent_in(raw)
    err = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{name}: max |KSampler - pipeline| = {err:.2e} (latents up to {scale:.2f})")
    assert err < 1e-4 * max(1.0, scale)
    if os.environ.get("VDIT_WRITE_FIXTURES"):
        native_cases.save_fixture(name, sigmas, theirs)


def test_model_sampling_sigmas_are_the_familys():
    """The native model's sigma table is the family's schedule (zero-SNR end clamped as ComfyUI
    does), and its simple scheduler gives the release's trailing timesteps."""
    case = native_cases.case("cogvideox-5b")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    ms = patcher.get_model_object("model_sampling")
    schedule = case.defaults["schedule"]
    assert torch.allclose(ms.sigmas[:-1].double(), schedule.sigmas[:-1], rtol=1e-6)
    assert abs(float(ms.sigma_max) - 4518.9) < 1.0  # ComfyUI's clamp of alpha_bar = 0
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 50)
    t = ms.timestep(sigmas[:-1]).long()
    assert t.tolist() == schedule.timesteps(50, "trailing").long().tolist()  # 999, 979, ..., 19


def test_open_sora_gets_its_resolution_and_length_shift():
    """KSampler's simple schedule on the Open-Sora model, shifted by the OUTER_SAMPLE wrapper, is
    the release's schedule for that size; a ModelSampling node's own sampling is left alone."""
    case = native_cases.case("opensora")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    ours = case.family.sigmas(case.defaults["schedule"], case.steps, None, tuple(case.noise.shape), 8)
    assert torch.allclose(comfy_sigmas(patcher, case).double(), ours, atol=1e-6)
    seen = []
    patched = patcher.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "probe",
                                 lambda ex, noise, latent, sampler, sigmas, *a, **k: seen.append(sigmas) or ex(noise, latent, sampler, sigmas, *a, **k))
    import comfy_extras.nodes_model_advanced as advanced

    sd3 = advanced.ModelSamplingSD3().patch(patched, shift=3.0)[0]
    with torch.no_grad():
        comfy.sample.sample(sd3, case.noise, 3, 1.0, "euler", "simple", native.conditioning(case.family, case.cond), [], torch.zeros_like(case.noise), disable_pbar=True)
    expected = comfy.samplers.calculate_sigmas(sd3.get_model_object("model_sampling"), "simple", 3)
    assert torch.allclose(seen[-1].cpu(), expected)


def test_memory_required_is_the_familys_activation_estimate():
    """ComfyUI frees memory (and decides whether to batch the CFG branches) by memory_required:
    for a vdit model it is the family's estimate of the transformer's activations, the same as
    the pipeline's for that request, and it grows with the batch and the video's length."""
    import comfy.sampler_helpers

    case = native_cases.case("cogvideox-5b")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    shape = tuple(case.noise.shape)
    conds = {"positive": comfy.sampler_helpers.convert_cond(native.conditioning(case.family, case.cond))}
    both, one = comfy.sampler_helpers.estimate_memory(patcher, shape, conds)
    expected = case.family.activation_bytes(case.transformer.config, (2, *shape[1:]), torch.float32)
    assert both == expected and one * 2 == both
    defaults = {k: v for k, v in case.defaults.items() if k != "latent_rgb"}
    pipe = Pipeline(transformer=case.transformer, vae=None, text_encoder=None, family=case.family, **defaults)
    frames = (shape[2] - 1) * 4 + 1  # CogVideoX: 4 frames per latent frame after the first
    assert pipe.latent_shape(frames, shape[3] * 8, shape[4] * 8) == shape
    assert pipe.memory_estimate(frames, shape[3] * 8, shape[4] * 8)["transformer"] == both
    longer = (1, shape[1], shape[2] * 2, *shape[3:])
    assert patcher.model.memory_required(longer) > one


def test_context_windows_cut_the_familys_time_inputs_and_sample():
    """ComfyUI's context windows: the model cuts its inputs that run along time (CogVideoX's image
    latents, Open-Sora's held frames and their mask) to the window's frames, and leaves the rest
    to ComfyUI; KSampler runs with windows over a demo video."""
    import comfy.conds
    import comfy.context_windows as cw

    case = native_cases.case("opensora-i2v")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    t = case.noise.shape[2]
    frames = frames_conditioning(case.family, case.transformer.config, case.frame_latents, t)
    window = cw.IndexListContextWindow([1, 2], dim=2)
    x = case.noise
    for key, value in frames.items():
        cond = comfy.conds.CONDRegular(value.long() if value.dtype == torch.bool else value)
        cut = patcher.model.resize_cond_for_context_window(native.PREFIX + key, cond, window, x, "cpu")
        axis = 2 if value.ndim == 5 else 1
        assert torch.equal(cut.cond, cond.cond.index_select(axis, torch.tensor([1, 2])))
    text = comfy.conds.CONDRegular(case.cond[case.family.text_state])
    assert patcher.model.resize_cond_for_context_window("c_crossattn", text, window, x, "cpu") is None

    demo = native_cases.case("demo")
    model = native.native_model(demo.transformer, demo.family, native_cases.demo_folder(), "demo", demo.defaults)
    import comfy_extras.nodes_context_windows as nodes_cw

    windowed = nodes_cw.ContextWindowsManualNode.execute(model, 3, 1, "standard_static", 1, False, "pyramid", 2)
    windowed = getattr(windowed, "result", windowed)[0]
    positive, negative = native.conditioning(demo.family, demo.cond), native.conditioning(demo.family, demo.uncond)
    with torch.no_grad():
        out = comfy.sample.sample(windowed, demo.noise, 3, demo.cfg, "euler", "simple", positive, negative,
                                  torch.zeros_like(demo.noise), seed=0, disable_pbar=True)
        plain = comfy.sample.sample(model, demo.noise, 3, demo.cfg, "euler", "simple", positive, negative,
                                    torch.zeros_like(demo.noise), seed=0, disable_pbar=True)
    assert out.shape == demo.noise.shape and torch.isfinite(out).all()
    assert not torch.equal(out, plain)  # the windows did run: 5 latent frames in windows of 3


@pytest.mark.parametrize("name", ["demo", "cogvideox-5b-i2v", "hunyuandit-v1.2", "opensora"])
def test_castable_layers_stream_under_a_low_vram_load(name):
    """On a GPU the native model's layers are ComfyUI's cast layers, so ComfyUI's low-VRAM load can
    keep their weights in CPU memory and bring each in as it runs. With a budget of 1 byte the
    forward gives exactly the plain model's output; on a meta load device every tensor the
    forward touches must follow the input (a tensor left in CPU memory fails)."""
    import comfy.model_patcher
    from vdit_core.pipeline import network_call

    case = native_cases.case(name)
    cond = dict(case.cond)
    if case.frame_latents is not None:
        cond.update(frames_conditioning(case.family, case.transformer.config, case.frame_latents, case.noise.shape[2]))
    x, t = case.noise, torch.tensor([500.0])
    cond.update(case.family.sample_conditioning(case.transformer.config, tuple(x.shape), int(case.defaults["vae_scale"])))
    with torch.no_grad():
        plain = network_call(case.transformer, x, t, **cond)
    native.castable(case.transformer)
    assert case.transformer.state_dict().keys() == case.transformer.state_dict().keys()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(case.transformer, load_device=cpu, offload_device=cpu)
    patcher.load(cpu, lowvram_model_memory=1)
    assert sum(bool(getattr(m, "comfy_cast_weights", False)) for m in case.transformer.modules()) > 10  # streamed
    with torch.no_grad():
        assert torch.equal(network_call(case.transformer, x, t, **cond), plain)
    patcher.detach()

    meta = torch.device("meta")
    fresh = native.castable(native_cases.case(name).transformer)
    comfy.model_patcher.ModelPatcher(fresh, load_device=meta, offload_device=cpu).load(meta, lowvram_model_memory=1)
    with torch.no_grad():
        # values the model reads stay on the CPU: per-sample numbers (Open-Sora's fps, size), and
        # Open-Sora's text mask (it drops the tokens masked everywhere) is left out
        meta_cond = {k: v.to(meta) if v.ndim > 1 else v for k, v in cond.items() if not (name == "opensora" and k == "mask")}
        out = network_call(fresh, x.to(meta), t.to(meta), **meta_cond)
    assert out.shape == plain.shape


def test_latent_format_round_trips_and_previews(monkeypatch):
    case = native_cases.case("opensora")
    fmt = native.native_model(case.transformer, case.family, None, "x", case.defaults).model.latent_format
    z = torch.randn(1, 4, 2, 3, 5)
    assert torch.allclose(fmt.process_out(fmt.process_in(z)), z, atol=1e-6)
    assert fmt.latent_dimensions == 3 and fmt.latent_channels == 4
    # no factors were fitted to Open-Sora's VAE: its first three channels as RGB, so ComfyUI previews it
    assert fmt.latent_rgb_factors == [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]] and fmt.latent_rgb_factors_bias == [0, 0, 0]
    import latent_preview

    monkeypatch.setattr(latent_preview.args, "preview_method", latent_preview.LatentPreviewMethod.Auto)  # --preview-method auto
    assert isinstance(latent_preview.get_previewer("cpu", fmt), latent_preview.Latent2RGBPreviewer)  # what KSampler's callback uses
    demo = native_cases.case("demo")
    fmt = native.native_model(demo.transformer, demo.family, native_cases.demo_folder(), "demo", demo.defaults).model.latent_format
    assert len(fmt.latent_rgb_factors) == 2 and fmt.scale_factor == pytest.approx(1.8808143820303318)


def test_native_vae_round_trip_matches_the_vdit_vae():
    """ComfyUI's VAE class (VAEEncode / VAEDecode's calls) around the demo VAE: raw latents that
    the model's latent format scales to the vdit VAE's, and the same frames back."""
    from vdit_core.demo import demo_model_path
    from vdit_core.vae.cogvideox_vae import load_vae

    vae = load_vae(demo_model_path() / "vae", dtype=torch.float32)
    comfy_vae = native.native_vae(vae)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(9, 64, 64, 3, generator=g)  # IMAGE [F, H, W, 3]
    raw = comfy_vae.encode(frames)
    assert raw.shape == (1, 2, 3, 8, 8)
    video = frames.permute(3, 0, 1, 2)[None] * 2 - 1
    with torch.no_grad():
        scaled = vae.encode(video)
    assert torch.allclose(raw * vae.scaling_factor, scaled, atol=1e-5)
    images = comfy_vae.decode(raw)  # [B, F, H, W, 3] in [0, 1]
    with torch.no_grad():
        ref = ((vae.decode(scaled) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
    assert images.shape == (1, 9, 64, 64, 3)
    assert torch.allclose(images, ref, atol=1e-4)


def test_null_caption_takes_the_prompts_mask_in_a_cfg_batch():
    """Open-Sora's negative as released: an empty prompt is the learned null caption, read with the
    prompt's mask; ComfyUI batches the two branches in either order."""
    case = native_cases.case("opensora-null")
    diffusion = native.native_model(case.transformer, case.family, None, "x", case.defaults).model.diffusion_model
    cond = {"y": torch.cat([case.uncond["y"], case.cond["y"]]), "mask": torch.cat([case.uncond["mask"], case.cond["mask"]]),
            "drop_text": torch.tensor([True, False])}
    paired = diffusion._paired(cond, [1, 0], 2)
    assert torch.equal(paired["mask"], torch.cat([case.cond["mask"]] * 2))
    assert torch.equal(paired["y"], torch.cat([case.cond["y"]] * 2))  # (replaced by the null embedding in the model)
    assert diffusion._paired(cond, [1], 2) is cond  # a branch run alone keeps its own


def test_image_to_video_node_conditions_both_prompts_and_samples():
    """VDIT Image To Video on a CogVideoX image-to-video model (tiny, on the demo's 2-channel VAE):
    the first frame, resized to the video's size and encoded by ComfyUI's VAE object, is the
    conditioning's image latent (the family's scaling); KSampler then samples it."""
    import nodes as comfy_nodes

    from vdit_core import families
    from vdit_core.demo import demo_model_path
    from vdit_core.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
    from vdit_core.vae.cogvideox_vae import load_vae

    family = families.get("cogvideox")
    config = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1, in_channels=4, out_channels=2, text_embed_dim=16,
                             time_embed_dim=20, sample_height=8, sample_width=8, sample_frames=9, max_text_seq_length=8,
                             use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    transformer = native_cases._randomised(CogVideoXTransformer(config), 5)
    model = native.native_model(transformer, family, None, "tiny-i2v", {**family.sampling_defaults(None, config), "vae_scale": 8})
    vdit_vae = load_vae(demo_model_path() / "vae", dtype=torch.float32)
    vae = native.native_vae(vdit_vae)
    g = torch.Generator().manual_seed(0)
    text = lambda: native.conditioning(family, {"context": torch.randn(1, 8, 16, generator=g)})  # noqa: E731
    image = torch.rand(1, 80, 96, 3, generator=g)  # not the video's size: resized and centre-cropped
    node = PACK.NODE_CLASS_MAPPINGS["VDITImageToVideo"]()
    pos, neg, latent, trim = node.encode(model, text(), text(), vae, image, 64, 64, 9, 1)
    assert latent["samples"].shape == (1, 2, 3, 8, 8) and trim == 0
    concat = pos[0][1]["vdit_concat"]
    assert torch.equal(concat, neg[0][1]["vdit_concat"]) and concat.shape == (1, 2, 3, 8, 8)
    with torch.no_grad():
        first = vdit_vae.encode(native.resized(image, 64, 64).permute(3, 0, 1, 2)[None] * 2 - 1)
    assert torch.allclose(concat[:, :, :1], first, atol=1e-5) and not concat[:, :, 1:].any()
    out = comfy_nodes.KSampler().sample(model, 1, 3, 4.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    assert out.shape == (1, 2, 3, 8, 8) and torch.isfinite(out).all()
    t2v = PACK.NODE_CLASS_MAPPINGS["VDITLoadModel"]().load("vdit-demo (bundled)", "default", "auto")[0]
    with pytest.raises(ValueError, match="text-to-video model"):
        node.encode(t2v, text(), text(), vae, image, 64, 64, 9, 1)


def test_lora_loader_applies_a_demo_lora_trained_by_the_trainer(tmp_path):
    """ComfyUI's LoraLoaderModelOnly on the native demo model with a LoRA that ``python -m
    vdit_core.train`` wrote: strength 0 samples exactly the plain model's latents, strength 1
    changes them (KSampler, same seed)."""
    import nodes as comfy_nodes

    from vdit_core.demo import shapes
    from vdit_core.train.trainer import main as train

    shapes.write_dataset(tmp_path / "data", seed=0, clips_per_combo=1, combos=shapes.train_combos()[:2])
    out = tmp_path / "run"
    assert train(["--model", str(native_cases.demo_folder()), "--data", str(tmp_path / "data"), "--output", str(out),
                  "--cache-dir", str(tmp_path / "cache"), "--steps", "3", "--lora-rank", "4", "--lr", "1e-2"]) == 0
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(out))
    model = PACK.NODE_CLASS_MAPPINGS["VDITLoadModel"]().load("vdit-demo (bundled)", "default", "auto")[0]
    te = PACK.NODE_CLASS_MAPPINGS["VDITTextEncoderLoader"]().load("vdit-demo (bundled)", "default", 0)[0]
    encode = PACK.NODE_CLASS_MAPPINGS["VDITPromptEncode"]()
    pos, neg = encode.encode(te, "a red circle moving right")[0], encode.encode(te, "")[0]
    latent = PACK.NODE_CLASS_MAPPINGS["VDITEmptyLatentVideo"]().generate(model, 64, 64, 17, 1)[0]

    def sample(m):
        return comfy_nodes.KSampler().sample(m, 7, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    loader = comfy_nodes.LoraLoaderModelOnly()
    plain = sample(model)
    off = sample(loader.load_lora_model_only(model, "lora.safetensors", 0.0)[0])
    on = sample(loader.load_lora_model_only(model, "lora.safetensors", 1.0)[0])
    assert torch.equal(off, plain)
    assert (on - plain).abs().max() > 1e-3
    assert torch.equal(sample(model), plain)  # the loaded model is as it was


def test_a_cancel_during_native_decode_stops_after_the_chunk_in_hand(monkeypatch):
    """ComfyUI's VAE Decode on a vdit VAE checks for a cancel after each decoded chunk (and moves
    ComfyUI's progress bar): a cancel during a long decode stops it there."""
    import nodes as comfy_nodes

    from vdit_core.demo import demo_model_path
    from vdit_core.vae.cogvideox_vae import load_vae

    vae = native.native_vae(load_vae(demo_model_path() / "vae", dtype=torch.float32))
    latent = {"samples": torch.randn(1, 2, 9, 8, 8, generator=torch.Generator().manual_seed(0))}  # 33 frames, several chunks
    chunks, progress = [], []

    class Cancelled(Exception):
        pass

    def interrupted():
        chunks.append(1)
        if len(chunks) == 2:
            raise Cancelled

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupted)
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", lambda self, value, total=None, preview=None: progress.append(value))
    with pytest.raises(Cancelled):
        comfy_nodes.VAEDecode().decode(vae, latent)
    assert len(chunks) == 2 and progress and progress[-1] < 100  # stopped after the second chunk, before the end


def test_cogvideox_15_pads_an_odd_latent_count_and_says_what_to_trim():
    """CogVideoX 1.5 samples an odd latent count padded in front to its temporal patch of 2 (as its
    release does): VDIT Empty Latent Video makes the padded latents and says how many frames
    ComfyUI's TrimVideoLatent must cut after the sampler; what is left is the pipeline's video
    latents, which decode to the requested frames."""
    from comfy_extras.nodes_wan import TrimVideoLatent

    case = native_cases.case("cogvideox-1.5")
    patcher = native.native_model(case.transformer, case.family, None, "tiny-1.5", case.defaults)
    empty = PACK.NODE_CLASS_MAPPINGS["VDITEmptyLatentVideo"]()
    latent, trim = empty.generate(patcher, 48, 32, 9, 1)  # 3 latent frames: padded to 4
    assert latent["samples"].shape == case.noise.shape == (1, 4, 4, 4, 6) and trim == 1
    assert empty.generate(patcher, 48, 32, 13, 1)[1] == 0  # 4 latent frames: nothing to pad
    five_b = native_cases.case("cogvideox-5b")
    assert empty.generate(native.native_model(five_b.transformer, five_b.family, None, "tiny-5b", five_b.defaults), 48, 32, 9, 1)[1] == 0
    with torch.no_grad():
        raw = comfy_sample(patcher, case)
    out = TrimVideoLatent.execute({**latent, "samples": raw}, trim)
    trimmed = (out.result if hasattr(out, "result") else out)[0]["samples"]
    keep, _ = case.family.latent_frames(case.transformer.config, 9)
    assert trimmed.shape[2] == keep == 3 and (keep - 1) * 4 + 1 == 9
    ours = vdit_sample(case, comfy_sigmas(patcher, case))[:, :, -keep:]  # the pipeline's crop of the padded run
    assert (patcher.model.process_latent_in(trimmed) - ours).abs().max() < 1e-4 * max(1.0, ours.abs().max().item())


def test_single_text_encoder_files_find_comfyuis_tokenizers():
    """A T5 file from text_encoders/ and HunyuanDiT's single file take ComfyUI's own tokenizer
    files: the folder is found in this ComfyUI (where comfy.text_encoders has no __file__)."""
    root = __import__(f"{PACK.__name__}.nodes.comfy", fromlist=["x"]).tokenizer_root()
    assert (root / "t5_tokenizer").is_dir() and (root / "hydit_clip_tokenizer").is_dir()


def test_comfyui_serves_every_template_and_its_thumbnail(monkeypatch):
    """ComfyUI's own routes (app/custom_node_manager.py) list each bundled workflow as a template
    of the pack and serve its JSON and its thumbnail."""
    import asyncio
    import importlib.util
    import urllib.parse

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    # ComfyUI's `utils` package, as main.py has it before nodes.py puts comfy/ (and its utils.py)
    # first on the path
    package = Path(COMFY) / "utils"
    spec = importlib.util.spec_from_file_location("utils", package / "__init__.py", submodule_search_locations=[str(package)])
    utils = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "utils", utils)
    spec.loader.exec_module(utils)
    monkeypatch.delitem(sys.modules, "utils.json_util", raising=False)
    monkeypatch.delitem(sys.modules, "app.custom_node_manager", raising=False)
    from app.custom_node_manager import CustomNodeManager

    root = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (root / "workflows").glob("*.json"))

    async def fetch():
        app, routes = web.Application(), web.RouteTableDef()
        CustomNodeManager().add_routes(routes, app, [("vdit", str(root))])
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            got = {}
            for name in names:
                for suffix in (".json", ".jpg"):
                    r = await client.get("/api/workflow_templates/vdit/" + urllib.parse.quote(name + suffix))
                    got[name + suffix] = (r.status, r.content_type, len(await r.read()))
            return got

    for key, (status, kind, size) in asyncio.run(fetch()).items():
        assert status == 200 and size > 0, key
        assert kind == ("image/jpeg" if key.endswith(".jpg") else "application/json"), (key, kind)


def test_empty_latent_video_states_the_connected_familys_rule_once_and_ignores_no_number():
    """A size the connected model does not take is refused when the node runs, in one line with
    that family's rule and nearest values (ComfyUI repeats a validation message per declared input,
    and does not know the model then); a preset that disagrees with typed numbers is refused, not
    silently preferred."""
    case = native_cases.case("opensora")
    patcher = native.native_model(case.transformer, case.family, None, "tiny-opensora", case.defaults)
    node = PACK.NODE_CLASS_MAPPINGS["VDITEmptyLatentVideo"]
    assert node.VALIDATE_INPUTS() is True and node.VALIDATE_INPUTS("Open-Sora 360p 16:9 640x360") is True
    assert node.VALIDATE_INPUTS("bogus") == "resolution 'bogus': not one of this node's presets (pick one from the list, or custom)"
    with pytest.raises(ValueError) as e:
        node().generate(patcher, 64, 64, 20, 1)
    assert str(e.value).startswith("tiny-opensora: frames=20: Open-Sora's VAE codes 17-frame chunks") and "nearest valid: 18 or 22" in str(e.value)
    assert "CogVideoX" not in str(e.value) and "HunyuanDiT" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^resolution 'Open-Sora 360p 16:9 640x360' is 640x360, but width x height say 320x192: "
                                         r"set resolution to custom to use your numbers, or them to 640x360$"):
        node().generate(patcher, 320, 192, 17, 1, "Open-Sora 360p 16:9 640x360")
    with pytest.raises(ValueError, match=r"^duration 'Open-Sora 2s \(51 frames\)' is 51 frames, but frames says 17"):
        node().generate(patcher, 64, 64, 17, 1, "custom", "Open-Sora 2s (51 frames)")
    latent, trim = node().generate(patcher, 640, 360, 51, 1, "Open-Sora 360p 16:9 640x360", "Open-Sora 2s (51 frames)")
    assert latent["samples"].shape[-2:] == (45, 80) and trim == 0
    assert node().generate(patcher, 320, 192, 17, 1)[0]["samples"].shape[-2:] == (24, 40)  # custom: the typed numbers
