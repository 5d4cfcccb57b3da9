"""The ComfyUI nodes, run as plain Python (their fallbacks outside ComfyUI)."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

import tiny  # noqa: E402
from test_package import load_pack  # noqa: E402
from vdit_core.checkpoint import CheckpointError  # noqa: E402
from vdit_core.pipeline import load_pipeline  # noqa: E402
from vdit_core.video_io import read_video  # noqa: E402

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
comfy = __import__(f"{PACK.__name__}.nodes.comfy", fromlist=["x"])
node_sampling = __import__(f"{PACK.__name__}.nodes.sampling", fromlist=["x"])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_models")
    for variant in ("5b", "5b-i2v"):
        _, folder = tiny.reference_pipeline(root / "build", variant, "ddim")
        shutil.copytree(folder, root / "vdit" / f"tiny-{variant}")
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / sub).mkdir()
    comfy.set_paths(models=root, output=root / "output")
    return root


def test_node_specs_are_well_formed(models_dir):
    for name, cls in NODES.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, name
        for section in spec.values():
            for key, value in section.items():
                assert isinstance(value, tuple) and 1 <= len(value) <= 2, (name, key)
                kind = value[0]
                assert isinstance(kind, (str, list)), (name, key)
                opts = value[1] if len(value) == 2 else {}
                if isinstance(kind, list):  # file lists may be empty (an empty models/loras)
                    assert "default" not in opts or opts["default"] in kind, (name, key)
                elif kind in ("INT", "FLOAT"):
                    assert opts.get("min", -1e30) <= opts["default"] <= opts.get("max", 1e30), (name, key)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "vdit"
    assert NODES["VDITModelLoader"].INPUT_TYPES()["required"]["model"][1]["default"] == "vdit-demo (bundled)"
    assert "tiny-5b/" in NODES["VDITModelLoader"].INPUT_TYPES()["required"]["model"][0]


def _graph(models_dir, variant="5b", prompt="a red circle moving right", seed=3, **sampler_kw):
    name = f"tiny-{variant}/"
    model = NODES["VDITModelLoader"]().load(name, "default", "auto")[0]
    te = NODES["VDITTextEncoderLoader"]().load(name, "default", 0)[0]
    vae = NODES["VDITVAELoader"]().load(name, "default", "auto")[0]
    pos = NODES["VDITTextEncode"]().encode(te, prompt)[0]
    neg = NODES["VDITTextEncode"]().encode(te, "")[0]
    latent = NODES["VDITEmptyLatent"]().generate(model, 48, 32, 9, 1)[0]
    kw = dict(seed=seed, steps=4, cfg=6.0, sampler="default", schedule="default", denoise=1.0)
    kw.update(sampler_kw)
    return model, vae, pos, neg, latent, kw


def test_text_to_video_graph_writes_video_and_matches_the_pipeline(models_dir):
    model, vae, pos, neg, latent, kw = _graph(models_dir)
    out = NODES["VDITSampler"]().sample(model, pos, neg, latent, **kw)[0]
    frames = NODES["VDITVAEDecode"]().decode(vae, out, 2, "auto", 0, 0)[0]
    assert frames.shape == (9, 32, 48, 3) and frames.min() >= 0 and frames.max() <= 1
    ui = NODES["VDITSaveVideo"]().save(frames, 8.0, "vdit/test", "mp4")["ui"]
    saved = models_dir / "output" / ui["images"][0]["subfolder"] / ui["images"][0]["filename"]
    back, fps = read_video(saved)
    assert back.shape == (9, 32, 48, 3) and fps == 8 and ui["animated"] == (True,)
    pipe = load_pipeline(models_dir / "vdit" / "tiny-5b")  # the same seed gives the pipeline's video
    expected = pipe(prompt="a red circle moving right", num_frames=9, height=32, width=48, steps=4, cfg=6.0, seed=3, progress=False)
    assert (frames - expected).abs().max() < 1e-5


def test_the_sampler_node_and_the_pipeline_prepare_requests_in_one_place(models_dir, monkeypatch):
    """Both build their request with Pipeline.prepare, once per run, and the node's progress total
    comes from that request's sigmas (no second schedule computed for the bar)."""
    from vdit_core.pipeline import Pipeline

    prepared, sigmas, totals = [], [], []
    prepare, schedule = Pipeline.prepare, Pipeline.sigmas
    monkeypatch.setattr(Pipeline, "prepare", lambda self, **kw: prepared.append(prepare(self, **kw)) or prepared[-1])
    monkeypatch.setattr(Pipeline, "sigmas", lambda self, *a, **kw: sigmas.append(schedule(self, *a, **kw)) or sigmas[-1])
    progress = comfy.Progress
    monkeypatch.setattr(comfy, "Progress", lambda total, **kw: totals.append(total) or progress(total, **kw))
    model, vae, pos, neg, latent, kw = _graph(models_dir, steps=5, denoise=0.6)
    NODES["VDITSampler"]().sample(model, pos, neg, NODES["VDITVAEEncode"]().encode(vae, torch.rand(9, 32, 48, 3), 8, "off", 0, 0)[0], **kw)
    assert [r.mode for r in prepared] == ["video-to-video"] and len(sigmas) == 1 and totals == [len(prepared[0].sigmas) - 1] == [3]
    pipe = load_pipeline(models_dir / "vdit" / "tiny-5b")
    pipe(prompt="a red circle", num_frames=9, height=32, width=48, steps=2, progress=False)
    assert [r.mode for r in prepared] == ["video-to-video", "text-to-video"] and len(sigmas) == 2


def test_the_loader_node_and_load_pipeline_share_one_recipe(models_dir):
    """The same option checks, with the same words, before anything loads."""
    with pytest.raises(ValueError) as node_error:
        NODES["VDITModelLoader"]().load("tiny-5b/", "default", "auto", compile=True, gpu_blocks=2)
    with pytest.raises(ValueError) as lib_error:
        load_pipeline(models_dir / "vdit" / "tiny-5b", device="cpu", compile=True, gpu_blocks=2)
    assert str(node_error.value) == str(lib_error.value) and "cannot be combined" in str(lib_error.value)


def test_batch_samples_are_independent_of_batch_size(models_dir):
    model, vae, pos, neg, _, kw = _graph(models_dir)
    two = NODES["VDITEmptyLatent"]().generate(model, 48, 32, 9, 2)[0]
    out2 = NODES["VDITSampler"]().sample(model, pos, neg, two, **kw)[0]["samples"]
    one = NODES["VDITEmptyLatent"]().generate(model, 48, 32, 9, 1)[0]
    out1 = NODES["VDITSampler"]().sample(model, pos, neg, one, **{**kw, "seed": kw["seed"] + 1})[0]["samples"]
    assert (out2[1:] - out1).abs().max() < 1e-5  # sample b of a batch uses seed + b


def test_image_to_video_and_video_to_video(models_dir):
    model, vae, pos, neg, latent, kw = _graph(models_dir, "5b-i2v")
    image = torch.rand(1, 32, 48, 3)
    img_latent = NODES["VDITVAEEncode"]().encode(vae, image, 8, "off", 0, 0)[0]
    with pytest.raises(ValueError, match="image-to-video model"):
        NODES["VDITSampler"]().sample(model, pos, neg, latent, **kw)
    out = NODES["VDITSampler"]().sample(model, pos, neg, latent, **kw, image_latent=img_latent)[0]
    assert NODES["VDITVAEDecode"]().decode(vae, out, 2, "auto", 0, 0)[0].shape == (9, 32, 48, 3)
    # video-to-video: encode frames, partial denoise
    model, vae, pos, neg, _, kw = _graph(models_dir, "5b")
    video = torch.rand(9, 32, 48, 3)
    z = NODES["VDITVAEEncode"]().encode(vae, video, 8, "auto", 0, 0)[0]
    out = NODES["VDITSampler"]().sample(model, pos, neg, z, **{**kw, "denoise": 0.5})[0]
    assert out["samples"].shape == z["samples"].shape
    with pytest.raises(ValueError, match="4k\\+1"):
        NODES["VDITVAEEncode"]().encode(vae, torch.rand(6, 32, 48, 3), 8, "auto", 0, 0)


def test_empty_latent_rejects_bad_sizes_in_validation():
    cls = NODES["VDITEmptyLatent"]
    assert cls.VALIDATE_INPUTS(720, 480, 49) is True
    # the model is not known before the graph runs: every family's reason, each with its valid neighbours
    os_frames = "Open-Sora: frames={}: Open-Sora's VAE codes 17-frame chunks (5 latent frames each) and takes 17k or 17k + 4m + 1 frames; nearest valid: {}"
    assert cls.VALIDATE_INPUTS(720, 480, 50) == ("no model family takes this size: CogVideoX: frames=50: CogVideoX takes 4k+1 frames; nearest valid: 49 or 53 | "
                                                 "HunyuanDiT: frames=50: HunyuanDiT makes images; nearest valid: 1 | " + os_frames.format(50, "47 or 51"))
    assert cls.VALIDATE_INPUTS(720, 470, 49) == ("no model family takes this size: CogVideoX: height=470: must be a positive multiple of 16; nearest valid: 464 or 480 | "
                                                 "HunyuanDiT: frames=49: HunyuanDiT makes images; nearest valid: 1 | " + os_frames.format(49, "47 or 51"))
    assert cls.VALIDATE_INPUTS(640, 360, 20) == ("no model family takes this size: CogVideoX: frames=20: CogVideoX takes 4k+1 frames; nearest valid: 17 or 21 | "
                                                 "HunyuanDiT: frames=20: HunyuanDiT makes images; nearest valid: 1 | " + os_frames.format(20, "18 or 22"))
    # presets replace the widgets' values before the check
    assert cls.VALIDATE_INPUTS(300, 360, 20, "Open-Sora 360p 16:9 640x360", "Open-Sora 2s (51 frames)") is True
    assert cls.VALIDATE_INPUTS(640, 360, 17, "bogus") == "resolution 'bogus': not one of this node's presets (pick one from the list, or custom)"


def test_cancel_stops_within_one_step(models_dir, monkeypatch):
    model, _, pos, neg, latent, kw = _graph(models_dir)
    calls = {"net": 0, "checks": 0}
    real_forward = model.transformer.forward

    def counting_forward(*a, **k):
        calls["net"] += 1
        return real_forward(*a, **k)

    class Interrupted(Exception):
        pass

    def check():
        calls["checks"] += 1
        if calls["checks"] == 2:
            raise Interrupted("cancel pressed")

    monkeypatch.setattr(model.transformer, "forward", counting_forward)
    monkeypatch.setattr(comfy, "check_interrupt", check)
    with pytest.raises(Interrupted):
        NODES["VDITSampler"]().sample(model, pos, neg, latent, **{**kw, "steps": 20})
    assert calls["net"] == 2  # one batched (cond+uncond) evaluation per step: stopped after the 2nd of 20


def test_lora_node_chains_non_destructively_and_rejects_other_models(models_dir):
    model, vae, pos, neg, latent, kw = _graph(models_dir)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in model.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith("attn1.to_v"):
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g)
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g)
    save_file(tensors, str(models_dir / "loras" / "test_lora.safetensors"))
    save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.zeros(8, 4)}, str(models_dir / "loras" / "flux.safetensors"))
    apply = NODES["VDITLoraApply"]()
    assert "test_lora.safetensors" in NODES["VDITLoraApply"].INPUT_TYPES()["required"]["lora_name"][0]
    sample = NODES["VDITSampler"]().sample
    base = sample(model, pos, neg, latent, **kw)[0]["samples"]
    with_lora = apply.apply(model, "test_lora.safetensors", 0.5)[0]
    chained = apply.apply(with_lora, "test_lora.safetensors", 0.5)[0]
    changed = sample(with_lora, pos, neg, latent, **kw)[0]["samples"]
    assert not torch.equal(changed, base)
    assert len(chained.loras) == 2 and len(model.loras) == 0
    zero = apply.apply(model, "test_lora.safetensors", 0.0)[0]
    assert torch.equal(sample(zero, pos, neg, latent, **kw)[0]["samples"], base)
    assert torch.equal(sample(model, pos, neg, latent, **kw)[0]["samples"], base)  # removing the node restores it
    with pytest.raises(CheckpointError, match="a LoRA for another model"):
        apply.apply(model, "flux.safetensors", 1.0)


def test_decode_retries_tiled_when_out_of_memory(models_dir, monkeypatch):
    model, vae, pos, neg, latent, kw = _graph(models_dir)
    out = NODES["VDITSampler"]().sample(model, pos, neg, latent, **kw)[0]
    real = vae.vae.decode
    seen = []

    def decode(z, chunk_frames=2, tiling=None, output_device=None, progress=None):
        seen.append(tiling)
        if tiling is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, chunk_frames=chunk_frames, tiling=tiling, output_device=output_device, progress=progress)

    monkeypatch.setattr(vae.vae, "decode", decode)
    frames = NODES["VDITVAEDecode"]().decode(vae, out, 2, "auto", 16, 16)[0]
    assert frames.shape == (9, 32, 48, 3) and seen[0] is None and seen[1] is not None
    with pytest.raises(torch.OutOfMemoryError):
        NODES["VDITVAEDecode"]().decode(vae, out, 2, "off", 0, 0)


@pytest.mark.parametrize("sized", [False, True])
def test_vae_retry_starts_after_the_failed_attempt_is_freed(monkeypatch, sized):
    """An out-of-memory VAE run is retried with tiles; retried inside the except block, the
    exception's traceback kept the failed attempt's frames and their GPU tensors alive, so the
    retry had that much less memory (and freeing the cache freed none of it)."""
    import weakref

    from vdit_core.vae.common import Tiling

    node_vae = __import__(f"{PACK.__name__}.nodes.vae", fromlist=["x"])
    first, freed = [], []

    def run(tiling):
        if not first:
            activations = torch.ones(8)  # the failed attempt's tensors, held by its frame
            first.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        freed.append(("retry", first[0]() is None))
        return tiling

    monkeypatch.setattr(node_vae.comfy, "free_cache", lambda: freed.append(("free_cache", first[0]() is None)))
    vae = types.SimpleNamespace(spatial_compression=8, default_tiling=lambda: Tiling(64, 96),
                                auto_tiling=lambda f, h, w: Tiling(128, 128) if sized else None)
    tiling = node_vae._run(run, vae, "auto", 0, 0, 9, 480, 720)
    assert freed == [("free_cache", True), ("retry", True)]
    assert (tiling.tile_height, tiling.tile_width) == ((64, 64) if sized else (64, 96))


def test_missing_files_and_single_file_tokenizer_errors(models_dir):
    with pytest.raises(FileNotFoundError, match="not in any diffusion_models model folder"):
        NODES["VDITModelLoader"]().load("nope.safetensors", "default", "auto")
    te_file = models_dir / "text_encoders" / "t5.safetensors"
    src = models_dir / "vdit" / "tiny-5b" / "text_encoder" / "model.safetensors"
    te_file.write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        NODES["VDITTextEncoderLoader"]().load("t5.safetensors", "default", 0)
    shutil.copytree(models_dir / "vdit" / "tiny-5b" / "tokenizer", models_dir / "text_encoders" / "tokenizer")
    enc = NODES["VDITTextEncoderLoader"]().load("t5.safetensors", "default", 0)[0]
    assert enc.encoder.max_length == 226 and enc.encoder.encode("x").shape[-1] == tiny.TEXT_DIM
    np.testing.assert_equal(enc.name, "t5.safetensors")


def test_every_node_explains_itself_and_every_input_has_a_tooltip():
    for name, cls in NODES.items():
        assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 20, name
        for section in cls.INPUT_TYPES().values():
            for key, value in section.items():
                assert len(value) == 2 and value[1].get("tooltip"), (name, key)
    text = " ".join(cls.DESCRIPTION.lower() for cls in NODES.values())  # what ComfyUI's node search indexes
    for words in ("cogvideox", "video sampler", "text-to-video", "text to video", "hunyuandit"):
        assert words in text, words


@pytest.mark.parametrize("family", ["cogvideox", "hunyuandit"])
def test_previews_use_the_familys_latent_to_rgb_factors(family):
    """CogVideoX's published 16-channel factors, HunyuanDiT's SDXL ones: a zero latent shows the
    bias colour, one channel alone its row of factors."""
    from vdit_core.families import get

    factors, bias = get(family).latent_rgb
    c = len(factors)
    assert c == {"cogvideox": 16, "hunyuandit": 4}[family] and all(len(row) == 3 for row in factors) and len(bias) == 3
    img = node_sampling._preview(torch.zeros(1, c, 1, 2, 3), 8, (factors, bias))
    assert img.mode == "RGB" and img.size == (24, 16) and img.getpixel((0, 0)) == tuple(round((b + 1) / 2 * 255) for b in bias)
    for ch in (0, c - 1):
        z = torch.zeros(1, c, 1, 2, 3)
        z[:, ch] = 1.0
        assert node_sampling._preview(z, 1, (factors, bias)).getpixel((0, 0)) == tuple(
            round(min(max((f + b + 1) / 2, 0), 1) * 255) for f, b in zip(factors[ch], bias))


def test_a_folder_of_downloaded_weights_alone_is_offered_and_refused_with_what_it_lacks(models_dir):
    """What a download dialog lists is only the weights: such a folder shows in the loaders'
    lists, and loading it names the missing configs and tokenizers in one line."""
    src, dst = models_dir / "vdit" / "tiny-5b", models_dir / "vdit" / "weights-only"
    for f in src.rglob("*.safetensors"):
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.relative_to(src))
    try:
        for node in ("VDITLoadModel", "VDITModelLoader", "VDITVAELoader", "VDITTextEncoderLoader"):
            spec = NODES[node].INPUT_TYPES()["required"]
            assert "weights-only/" in next(iter(spec.values()))[0], node
        with pytest.raises(CheckpointError, match=r"weights-only/: an incomplete CogVideoX model folder: it lacks model_index.json, "
                                                  r"transformer/config.json; the weights alone do not load"):
            NODES["VDITModelLoader"]().load("weights-only/", "default", "auto")
        with pytest.raises(CheckpointError, match=r"it lacks model_index.json, text_encoder/config.json, tokenizer/"):
            NODES["VDITTextEncoderLoader"]().load("weights-only/", "default", 0)
        with pytest.raises(CheckpointError, match=r"it lacks model_index.json, vae/config.json"):
            NODES["VDITVAELoader"]().load("weights-only/", "default", "auto")
    finally:
        shutil.rmtree(dst)
