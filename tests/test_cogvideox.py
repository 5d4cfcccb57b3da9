"""CogVideoX against diffusers: tiny random models of every variant, saved in the official
layouts (diffusers folder, single file, SAT), loaded with our loaders and compared."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

import tiny  # noqa: E402
from report import REPORT  # noqa: E402
from vdit_core import families  # noqa: E402
from vdit_core.checkpoint import CheckpointError  # noqa: E402
from vdit_core.models.cogvideox import load_transformer  # noqa: E402
from vdit_core.pipeline import Pipeline, load_pipeline  # noqa: E402
from vdit_core.text import load_t5  # noqa: E402
from vdit_core.vae.cogvideox_vae import CogVideoXVAEConfig, Tiling, load_vae  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid  # noqa: E402

def _rope(m, t, h, w):
    c = m.config
    p = c.patch_size
    if not c.use_rotary_positional_embeddings:
        return None
    gh, gw = h // p, w // p
    if c.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // p, c.sample_height // p)
        return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), t)
    return get_3d_rotary_pos_embed(
        c.attention_head_dim, None, (gh, gw), (t + c.patch_size_t - 1) // c.patch_size_t, grid_type="slice",
        max_size=(c.sample_height // p, c.sample_width // p),
    )


def _reference_out(ref, x, ctx, t):
    """diffusers' forward on our [B, C, T, H, W] layout."""
    kw = {"ofs": torch.tensor([2.0])} if ref.config.ofs_embed_dim else {}
    out = ref(
        hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=ctx, timestep=t,
        image_rotary_emb=_rope(ref, x.shape[2], x.shape[3], x.shape[4]), return_dict=False, **kw,
    )[0]
    return out.permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def transformers_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    out = {}
    for variant in tiny.VARIANTS:
        torch.manual_seed(0)
        ref = diffusers.CogVideoXTransformer3DModel(**tiny.transformer_kwargs(variant)).eval()
        d = root / variant
        ref.save_pretrained(str(d), safe_serialization=True)
        out[variant] = (ref, d)
    return out


def _inputs(ref):
    c = ref.config
    t = 4 if c.patch_size_t else 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.in_channels, t, 4, 6, generator=g)
    ctx = torch.randn(2, 226, tiny.TEXT_DIM, generator=g)
    return x, ctx, torch.tensor([999.0, 421.0])


@pytest.mark.parametrize("variant", list(tiny.VARIANTS))
@pytest.mark.parametrize("layout", ["folder", "single_file", "sat_pt", "sat_safetensors"])
def test_transformer_matches_diffusers(transformers_saved, tmp_path, variant, layout):
    ref, folder = transformers_saved[variant]
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if layout == "folder":
        path, config = folder, None
    elif layout == "single_file":
        path = tmp_path / "transformer.safetensors"
        save_file(sd, str(path))
        config = None
    else:
        sat = tiny.to_sat_transformer(sd)
        if layout == "sat_pt":
            path = tmp_path / "mp_rank_00_model_states.pt"
            torch.save({"module": sat}, str(path))
        else:
            path = tmp_path / "sat.safetensors"
            save_file(sat, str(path))
        config = None
    if config is None and layout != "folder":
        # a single file cannot tell its trained sample size or 2B's sin-cos positions: pass what
        # the weights cannot say via the folder's config (real releases are detected from width)
        from vdit_core.models.cogvideox import CogVideoXConfig
        from vdit_core.checkpoint import read_json

        config = CogVideoXConfig.from_diffusers(read_json(folder / "config.json"))
    ours = load_transformer(path, config=config)
    x, ctx, t = _inputs(ref)
    with torch.no_grad():
        err = (ours(x, t, ctx) - _reference_out(ref, x, ctx, t)).abs().max().item()
    REPORT[f"transformer {variant} {layout}"] = err
    assert err < 1e-5


def test_single_file_variant_detection_from_weights(transformers_saved, tmp_path):
    """Without a config, the variant is read off the weights (sample size from the release)."""
    from vdit_core.models.cogvideox import infer_config

    for variant, (ref, folder) in transformers_saved.items():
        sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        cfg = infer_config(sd)
        assert cfg.num_layers == 2 and cfg.attention_head_dim == 16 and cfg.num_attention_heads == 2
        assert cfg.in_channels == ref.config.in_channels and cfg.out_channels == 4
        assert cfg.patch_size_t == ref.config.patch_size_t
        assert cfg.ofs_embed_dim == ref.config.ofs_embed_dim
        assert cfg.use_learned_positional_embeddings == ref.config.use_learned_positional_embeddings


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_transformer_loads_in_requested_dtype(transformers_saved, dtype):
    ref, folder = transformers_saved["5b"]
    ours = load_transformer(folder, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert not any(p.is_meta for p in ours.parameters())
    x, ctx, t = _inputs(ref)
    with torch.no_grad():
        low = ours(x, t, ctx).float()
        full = load_transformer(folder)(x, t, ctx)
    assert (low - full).abs().max() < 0.1 * full.abs().max()


# ----------------------------------------------------------------------------------------------
# VAE


@pytest.fixture(scope="module")
def vae_saved(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLCogVideoX(**tiny.VAE).eval()
    d = tmp_path_factory.mktemp("vae") / "vae"
    ref.save_pretrained(str(d), safe_serialization=True)
    return ref, d


def test_vae_decode_in_frame_slices_and_with_autograd_matches(vae_saved, monkeypatch):
    """The decoder's convolutions run over slices of output frames when a chunk is large (here
    forced to one frame per slice) and its SpatialNorm resizes by broadcasting without autograd:
    the result is diffusers' either way, and with autograd on (interpolation, no in-place ops)
    too."""
    from vdit_core.vae import causal_conv

    ref, folder = vae_saved
    ours = load_vae(folder)
    z = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(z * (1 / ref.config.scaling_factor)).sample
        whole = ours.decode(z)
        monkeypatch.setattr(causal_conv, "SLICE_ELEMENTS", 1)
        sliced = ours.decode(z)
    with torch.enable_grad():
        graded = ours.decode(z.requires_grad_())
    assert graded.requires_grad
    for got in (whole, sliced, graded.detach()):
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("frames", [1, 9, 17, 25])
def test_vae_encode_decode_match_diffusers(vae_saved, frames):
    ref, folder = vae_saved
    ours = load_vae(folder)
    video = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        m_ref = ref.encode(video).latent_dist.mean
        m_ours = ours.encode(video) / ours.config.scaling_factor
        z = torch.randn(1, 4, (frames - 1) // 4 + 1, 4, 6, generator=torch.Generator().manual_seed(0))
        d_ref = ref.decode(z * (1 / ref.config.scaling_factor)).sample
        d_ours = ours.decode(z)
    REPORT[f"vae encode {frames}f"] = (m_ours - m_ref).abs().max().item()
    REPORT[f"vae decode {frames}f"] = (d_ours - d_ref).abs().max().item()
    assert m_ours.shape == m_ref.shape and (m_ours - m_ref).abs().max() < 1e-5
    assert d_ours.shape == d_ref.shape and (d_ours - d_ref).abs().max() < 1e-5


def test_vae_tiled_paths_match_diffusers_and_untiled(vae_saved):
    ref, folder = vae_saved
    ours = load_vae(folder)
    # 48-pixel tiles with overlaps diffusers' int() rounding keeps self-consistent (as the
    # release's 240x360 tiles are), so both tilings must agree exactly: a 2x3 grid over 64x80
    tiling = Tiling(48, 48, 1 / 6, 1 / 3)
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=48, tile_overlap_factor_height=1 / 6, tile_overlap_factor_width=1 / 3)
    video = torch.rand(1, 3, 9, 64, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, 4, 3, 8, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        enc_ref = ref.encode(video).latent_dist.mean
        enc_ours = ours.encode(video, tiling=tiling) / ours.config.scaling_factor
        dec_ref = ref.decode(z * (1 / ref.config.scaling_factor)).sample
        dec_ours = ours.decode(z, tiling=tiling)
        dec_untiled = ours.decode(z)
        enc_untiled = ours.encode(video) / ours.config.scaling_factor
    ref.disable_tiling()
    REPORT["vae tiled encode vs diffusers tiled"] = (enc_ours - enc_ref).abs().max().item()
    REPORT["vae tiled decode vs diffusers tiled"] = (dec_ours - dec_ref).abs().max().item()
    REPORT["vae tiled vs untiled decode (max, mean)"] = ((dec_ours - dec_untiled).abs().max().item(), (dec_ours - dec_untiled).abs().mean().item())
    REPORT["vae tiled vs untiled encode (max, mean)"] = ((enc_ours - enc_untiled).abs().max().item(), (enc_ours - enc_untiled).abs().mean().item())
    assert enc_ours.shape == enc_untiled.shape and dec_ours.shape == dec_untiled.shape == (1, 3, 9, 64, 80)
    assert (enc_ours - enc_ref).abs().max() < 1e-5 and (dec_ours - dec_ref).abs().max() < 1e-5
    # random weights do not make tiles seamless; this only bounds the blend to sane values
    assert (dec_ours - dec_untiled).abs().mean() < 0.5 * dec_untiled.abs().mean()


def test_vae_tiling_stays_aligned_for_any_tile_size(vae_saved):
    """Tile sizes whose overlaps do not divide evenly still give full-size, blended output."""
    _, folder = vae_saved
    vae = load_vae(folder)
    z = torch.randn(1, 4, 3, 6, 8, generator=torch.Generator().manual_seed(6))
    video = torch.rand(1, 3, 9, 48, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        for tiling in (Tiling(32, 48), Tiling(24, 40, 0.3, 0.45), Tiling(16, 16, 0.5, 0.5)):
            assert vae.decode(z, tiling=tiling).shape == (1, 3, 9, 48, 64)
            assert vae.encode(video, tiling=tiling).shape == (1, 4, 3, 6, 8)


def test_vae_chunked_decode_with_explicit_cache_equals_one_call(vae_saved):
    _, folder = vae_saved
    vae = load_vae(folder)
    latents = torch.randn(1, 4, 7, 4, 6, generator=torch.Generator().manual_seed(5))
    z = latents * (1 / vae.config.scaling_factor)
    with torch.no_grad():
        whole = vae.decode(latents)
        cache, parts = {}, []
        for a, b in [(0, 3), (3, 5), (5, 7)]:  # the release's chunking, driven by hand
            x, cache = vae.decoder(z[:, :, a:b], cache, first=a == 0)
            parts.append(x)
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert not any(isinstance(v, torch.Tensor) for v in vars(vae.decoder.conv_in).values())  # no hidden state


def test_vae_round_trip_keeps_every_4k_plus_1_frame_count(vae_saved):
    """Even latent counts (13 frames -> 4 latents) decode to 13 frames too (the reference's
    parity rule gives 16); odd ones are unchanged (checked against diffusers above)."""
    _, folder = vae_saved
    vae = load_vae(folder)
    with torch.no_grad():
        for frames in (1, 5, 9, 13, 17, 21):
            video = torch.rand(1, 3, frames, 32, 48) * 2 - 1
            z = vae.encode(video)
            assert z.shape[2] == (frames - 1) // 4 + 1
            assert vae.decode(z).shape[2] == frames


def test_vae_sat_checkpoint_and_scaling(vae_saved, tmp_path):
    ref, folder = vae_saved
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "3d-vae.pt"
    torch.save({"state_dict": tiny.to_sat_vae(sd)}, str(path))
    ours = load_vae(path, config=CogVideoXVAEConfig(**{**{k: v for k, v in tiny.VAE.items()}, "block_out_channels": (8, 16, 16, 16)}))
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert (ours.encode(video) / ours.config.scaling_factor - ref.encode(video).latent_dist.mean).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# whole pipelines


def _image(h=32, w=48, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


PIPELINE_CASES = [
    ("2b", "ddim", 9),
    ("5b", "dpm", 9),
    ("5b-i2v", "ddim", 9),
    ("5b-i2v", "dpm", 9),
    ("1.5", "dpm", 9),
    ("1.5", "ddim", 17),
    ("1.5-i2v", "ddim", 9),
]


@pytest.mark.parametrize("variant,scheduler,frames", PIPELINE_CASES)
def test_pipeline_matches_diffusers(tmp_path, variant, scheduler, frames):
    ref, folder = tiny.reference_pipeline(tmp_path, variant, scheduler)
    steps, cfg, seed = 4, 6.0, 42
    kw = dict(prompt="a red circle moving right", negative_prompt="", num_frames=frames, height=32, width=48,
              num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed), output_type="pt")
    if "i2v" in variant:
        kw["image"] = _image()
    if scheduler == "dpm":
        kw["use_dynamic_cfg"] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(**kw).frames[0]  # [F, 3, H, W] in [0, 1]
        pipe = load_pipeline(folder, device="cpu")
        assert pipe.sampler == ("cogvideox_dpm" if scheduler == "dpm" else "ddim")
        got = pipe(
            prompt=kw["prompt"], negative_prompt="", num_frames=frames, height=32, width=48, steps=steps, cfg=cfg,
            seed=seed, image=kw.get("image"), dynamic_cfg=scheduler == "dpm", progress=False,
        )
    expected = expected.permute(0, 2, 3, 1)
    err = (got - expected).abs().max().item()
    REPORT[f"pipeline {variant} {scheduler} {frames}f"] = err
    assert got.shape == expected.shape
    assert err < 1e-4


def test_pipeline_with_a_4x_vae_matches_diffusers(tmp_path):
    """A VAE of three blocks compresses 4x in space (the demo model's); latent sizes follow the
    VAE, also where only the transformer is loaded (the nodes' Empty Latent, the trainer)."""
    ref, folder = tiny.reference_pipeline(tmp_path, "5b", "ddim", transformer=dict(patch_size=4, sample_height=8, sample_width=12),
                                          vae=dict(block_out_channels=(8, 16, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                                   up_block_types=("CogVideoXUpBlock3D",) * 3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(prompt="a red circle", num_frames=9, height=32, width=48, num_inference_steps=4, guidance_scale=6.0,
                       generator=torch.Generator().manual_seed(3), output_type="pt").frames[0].permute(0, 2, 3, 1)
        pipe = load_pipeline(folder, device="cpu")
        got = pipe(prompt="a red circle", num_frames=9, height=32, width=48, steps=4, cfg=6.0, seed=3, progress=False)
    assert pipe.spatial_scale == 4 and pipe.default_size == (9, 32, 48)
    assert got.shape == expected.shape == (9, 32, 48, 3)
    assert (got - expected).abs().max() < 1e-4
    bare = Pipeline(transformer=pipe.transformer, vae=None, text_encoder=None,
                    **pipe.family.sampling_defaults(folder, pipe.transformer.config))
    assert bare.spatial_scale == 4 and bare.default_size == (9, 32, 48)
    with pytest.raises(ValueError, match=r"width=40: must be a positive multiple of 16"):  # 4x VAE x patch 4
        bare.check_size(9, 32, 40)


def test_pipeline_video_to_video_matches_diffusers(tmp_path):
    ref_t2v, folder = tiny.reference_pipeline(tmp_path, "5b", "ddim")
    v2v = diffusers.CogVideoXVideoToVideoPipeline(**ref_t2v.components)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)
    from PIL import Image

    video_pil = [Image.fromarray(f) for f in frames]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = v2v(video=video_pil, prompt="a blue square moving up", num_inference_steps=5, guidance_scale=6.0,
                       strength=0.6, generator=torch.Generator().manual_seed(7), output_type="pt", height=32, width=48).frames[0]
        pipe = load_pipeline(folder)
        got = pipe(prompt="a blue square moving up", video=torch.from_numpy(frames).float() / 255, steps=5, cfg=6.0,
                   denoise=0.6, seed=7, progress=False)
    err = (got - expected.permute(0, 2, 3, 1)).abs().max().item()
    REPORT["pipeline 5b video-to-video"] = err
    assert err < 1e-4


def test_explicit_noise_and_padding_for_v15(tmp_path):
    _, folder = tiny.reference_pipeline(tmp_path, "1.5", "ddim")
    pipe = load_pipeline(folder)
    assert pipe.latent_frames(17) == (5, 6)  # 17 frames -> 5 latent frames -> padded to 6
    noise = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(0))
    a = pipe(prompt="x", num_frames=17, height=32, width=48, steps=2, noise=noise, progress=False)
    b = pipe(prompt="x", num_frames=17, height=32, width=48, steps=2, noise=noise, seed=123, progress=False)
    assert a.shape == (17, 32, 48, 3) and torch.equal(a, b)  # given noise: the seed does not matter (ddim)
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 4, 6, 4, 6\)"):
        pipe(prompt="x", num_frames=17, height=32, width=48, steps=2, noise=noise[:, :, :5], progress=False)


# ----------------------------------------------------------------------------------------------
# text encoder


def test_t5_single_file_with_tokenizer_folder(tmp_path):
    ref, folder = tiny.reference_pipeline(tmp_path, "2b", "ddim")
    single = tmp_path / "t5_encoder.safetensors"
    save_file(load_file(str(folder / "text_encoder" / "model.safetensors")), str(single))
    length = families.get("cogvideox").text_length
    enc = load_t5(single, folder / "tokenizer", max_length=length)
    enc_folder = load_t5(folder / "text_encoder", folder / "tokenizer", max_length=length)
    ids = ref.tokenizer(["a red circle"], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.text_encoder(ids)[0]
    assert torch.allclose(enc.encode("a red circle"), expected, atol=1e-6)
    assert torch.allclose(enc_folder.encode(["a red circle"]), expected, atol=1e-6)
    assert enc.encode(["a", "b c"]).shape == (2, 226, tiny.TEXT_DIM)


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_files_give_clear_errors(transformers_saved, vae_saved, tmp_path):
    _, tfolder = transformers_saved["5b"]
    _, vfolder = vae_saved
    # a VAE passed as a transformer
    with pytest.raises(CheckpointError, match=r"expected a CogVideoX transformer, but this looks like a CogVideoX VAE"):
        load_transformer(vfolder)
    with pytest.raises(CheckpointError, match=r"expected a CogVideoX VAE, but this looks like a CogVideoX transformer"):
        load_vae(tfolder)
    # truncated safetensors
    data = (tfolder / "diffusion_pytorch_model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        load_transformer(cut)
    # a mismatched config: the 2B preset against 5B-shaped weights
    from vdit_core.models.cogvideox import PRESETS

    with pytest.raises(CheckpointError, match=r"expected a CogVideoX transformer \(cogvideox-2b\).*other shapes|missing"):
        load_transformer(tfolder / "diffusion_pytorch_model.safetensors", config=PRESETS["cogvideox-2b"])
    # a pickle that carries code is refused, never executed
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Evil()}}, str(evil))
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        load_transformer(evil)
    # a missing shard
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}'
    )
    with pytest.raises(CheckpointError, match="missing"):
        load_transformer(sharded)
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "nope.safetensors")


def test_sharded_folder_loads(transformers_saved, tmp_path):
    ref, folder = transformers_saved["5b"]
    out = tmp_path / "sharded"
    ref.save_pretrained(str(out), safe_serialization=True, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    ours = load_transformer(out)
    x, ctx, t = _inputs(ref)
    with torch.no_grad():
        assert (ours(x, t, ctx) - _reference_out(ref, x, ctx, t)).abs().max() < 1e-5


def test_bad_sizes_name_valid_neighbours(tmp_path):
    _, folder = tiny.reference_pipeline(tmp_path, "5b", "ddim")
    pipe = load_pipeline(folder)
    with pytest.raises(ValueError, match=r"num_frames=50: CogVideoX takes 4k\+1 frames; nearest valid: 49 or 53"):
        pipe(prompt="x", num_frames=50, height=32, width=48)
    with pytest.raises(ValueError, match=r"height=40: must be a positive multiple of 16; nearest valid: 32 or 48"):
        pipe(prompt="x", num_frames=9, height=40, width=48)
    with pytest.warns(UserWarning, match="trained on 8N\\+1"):
        frames = pipe(prompt="x", num_frames=13, height=32, width=48, steps=1, progress=False)
    assert frames.shape[0] == 13  # 4 latents decode to the 13 frames asked for (diffusers gives 16)
    with pytest.raises(ValueError, match="image-to-video"):
        pipe(prompt="x", num_frames=9, height=32, width=48, image=_image())
