"""Each component in a dtype that is safe for it, whatever the transformer's: what a GPU user's
``--dtype fp16`` or ComfyUI's "default" on a float16 / float8 file gives, checked on a CPU.

* T5 / mT5 in float16 keep their feed-forward output layers (``wo``) in float32, as transformers
  loads them: weights built so that ``wo``'s product exceeds float16's range encode like float32.
* float8 T5 files (plain casts, ComfyUI's scaled fp8) load in a dtype T5 can compute in.
* Open-Sora's VAE (its spatial stage is the SDXL VAE, which overflows float16) never runs in
  float16.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny
from vdit_core import families
from vdit_core.text import T5TextEncoder, load_t5_model

FIXTURE = Path(__file__).parent / "fixtures" / "opensora"


def _t5_state(overflow: bool) -> dict[str, torch.Tensor]:
    """A tiny T5 encoder's weights (float32); ``overflow``: the first layer's ``wo`` maps its
    input to ~1e5 in channel 0 and ~2e5 in channel 1 (float16's largest value is 65504; clamped,
    both would read 64504), the other channels staying small."""
    sd = {k: v.clone() for k, v in tiny.tiny_t5().state_dict().items()}
    if overflow:
        sd["shared.weight"] = sd["shared.weight"].abs() + 5  # every token's normalised state ~ +1 in every channel
        for w in ("wi_0", "wi_1"):
            sd[f"encoder.block.0.layer.1.DenseReluDense.{w}.weight"].fill_(0.5)  # each ~ 0.5 x 16 channels = 8
        wo = sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"]  # [d_model, d_ff]: 32 products of ~64
        wo[0], wo[1] = 50.0, 100.0
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path))
    return path


@torch.no_grad()
def _encode(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state.float()


def test_t5_in_float16_keeps_wo_in_float32_and_encodes_like_float32(tmp_path):
    f16 = _save(_t5_state(overflow=True), tmp_path / "t5xxl_fp16.safetensors", torch.float16)
    ids = torch.tensor([[3, 7, 11, 1]])
    reference = _encode(load_t5_model(f16, torch.float32), ids)
    for dtype in (None, torch.float16):  # ComfyUI's "default" on a float16 file, and --dtype fp16
        model = load_t5_model(f16, dtype)
        wo = [m.weight.dtype for n, m in model.named_modules() if n.endswith(".wo")]
        assert wo and all(d == torch.float32 for d in wo)
        assert model.shared.weight.dtype == torch.float16
        out = _encode(model, ids)
        assert torch.isfinite(out).all()
        assert ((out - reference).abs().max() / reference.abs().max()) < 2e-2  # float16 rounding; a clamp gives ~1
    encoder = T5TextEncoder(load_t5_model(f16, torch.float32), tokenizer=None, max_length=16).to(dtype=torch.float16)
    assert encoder.model.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert encoder.dtype == torch.float16


@pytest.mark.parametrize("scaled", [False, True])
def test_float8_t5_file_loads_in_a_dtype_t5_computes_in(tmp_path, scaled):
    """A plain float8 cast of every matrix (the token embedding too) computes in bfloat16; ComfyUI's
    scaled fp8 (linear layers only, ``scale_weight``, the ``scaled_fp8`` marker) in the dtype of
    its other weights, float16 here, with ``wo`` in float32."""
    sd = _t5_state(overflow=False)
    f8 = torch.float8_e4m3fn
    out, expected = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and not (scaled and k in ("shared.weight", "encoder.embed_tokens.weight")):
            scale = v.abs().max() / 448 if scaled else torch.tensor(1.0)
            out[k] = (v / scale).to(f8)
            expected[k] = out[k].float() * scale
            if scaled:
                out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[k], expected[k] = v.half(), v.half().float()
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=f8)
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(out, str(path))
    compute = torch.float16 if scaled else torch.bfloat16
    ids = torch.tensor([[3, 7, 11, 1]])
    reference = _encode(load_t5_model(_save(expected, tmp_path / "dequantised.safetensors", torch.float32), compute), ids)
    with pytest.warns(UserWarning, match=f"float8 text encoder weights are upcast to {str(compute).removeprefix('torch.')}"):
        model = load_t5_model(path, None)
    assert not any(p.dtype in (f8, torch.float8_e5m2) for p in model.parameters())
    assert model.shared.weight.dtype == compute and model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == compute
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (torch.float32 if scaled else compute)
    got = _encode(model, ids)
    assert torch.isfinite(got).all() and (got - reference).abs().max() < 1e-2  # the scale applied in float16: rounding
    with pytest.warns(UserWarning, match="upcast to float32"):
        assert {p.dtype for p in load_t5_model(path, torch.float32).parameters()} == {torch.float32}


def test_opensora_vae_never_runs_in_float16(tmp_path):
    family = families.get("opensora")
    with pytest.warns(UserWarning, match="Open-Sora's VAE runs in bfloat16, not float16"):
        vae = family.load_vae(FIXTURE / "vae", torch.float16, "cpu")
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    # a float16 file read in its own dtype (ComfyUI's "default"): bfloat16 too, the normalisation float32
    f16 = tmp_path / "vae"
    shutil.copytree(FIXTURE / "vae", f16)
    from safetensors.torch import load_file

    sd = load_file(f16 / "model.safetensors")
    _save(sd, f16 / "model.safetensors", torch.float16)
    with pytest.warns(UserWarning, match="float16 weights; Open-Sora.s VAE runs in bfloat16, not float16"):
        vae = family.load_vae(f16, None, "cpu")
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16} and vae.shift.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 and bfloat16 load as asked, silently
        assert family.load_vae(FIXTURE / "vae", torch.bfloat16, "cpu").dtype == torch.bfloat16
        assert family.load_vae(FIXTURE / "vae", torch.float32, "cpu").dtype == torch.float32


def test_a_float16_pipeline_gives_each_component_a_safe_dtype(tmp_path):
    """``load_pipeline(dtype=fp16)`` passes float16 to every component: the transformer runs in
    it, T5 keeps ``wo`` in float32, and Open-Sora's VAE takes bfloat16."""
    from vdit_core.pipeline import load_pipeline

    out = tmp_path / "opensora"
    shutil.copytree(FIXTURE / "transformer", out / "transformer")
    shutil.copytree(FIXTURE / "vae", out / "vae")
    tiny.tiny_t5().save_pretrained(out / "text_encoder")
    shutil.copytree(tiny.tokenizer_dir(str(tmp_path)), out / "tokenizer")
    with pytest.warns(UserWarning, match="Open-Sora's VAE runs in bfloat16"):
        pipe = load_pipeline(out, device="cpu", dtype=torch.float16)
    assert next(pipe.transformer.parameters()).dtype == torch.float16
    assert pipe.vae.dtype == torch.bfloat16
    t5 = pipe.text_encoder.model
    assert t5.shared.weight.dtype == torch.float16 and t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
