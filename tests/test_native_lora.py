"""ComfyUI's own LoRA loading on native vdit models (nodes/native.py): ``comfy.sd.load_lora_for_models``
as LoraLoader and LoraLoaderModelOnly call it, patching the model's weights, against vdit_core's
LoRA (forward hooks on the transformer) on the same files: ours (what ``python -m vdit_core.train``
writes), diffusers/PEFT, kohya, and Tencent's fused HunyuanDiT names.

Run where ``VDIT_COMFYUI`` names a ComfyUI checkout whose dependencies are importable (see
``test_native.py``); skipped elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

COMFY = os.environ.get("VDIT_COMFYUI")
if not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file():
    pytest.skip("VDIT_COMFYUI does not name a ComfyUI checkout", allow_module_level=True)
sys.path.insert(0, COMFY)

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True  # ComfyUI's --cpu
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import native_cases  # noqa: E402
from report import REPORT  # noqa: E402
from test_package import load_pack  # noqa: E402
from vdit_core.lora import LoRANames, inject_lora, load_lora, save_lora  # noqa: E402

PACK = load_pack()
native = __import__(f"{PACK.__name__}.nodes.native", fromlist=["x"])

FAMILIES = ("cogvideox-5b", "hunyuandit-v1.2", "opensora")
RANK, ALPHA = 3, 6.0
NOT_LOADED = ("lora key not loaded", "NOT LOADED", "ERROR", "vdit:")  # what ComfyUI (and vdit) log for a LoRA part left out


def denoised(patcher, case) -> torch.Tensor:
    """One denoiser call through ComfyUI's model (``apply_model``: model sampling, the diffusion
    model, the denoised x0) with the case's conditioning, after ComfyUI loads the patcher (which
    applies its weight patches)."""
    comfy.model_management.load_models_gpu([patcher])
    return loaded_denoised(patcher, case).clone()


def loaded_denoised(patcher, case) -> torch.Tensor:
    """:func:`denoised` on the patcher as it is loaded now (no new load)."""
    model = patcher.model
    (main, extra), = native.conditioning(case.family, case.cond)
    conds = model.extra_conds(cross_attn=main, noise=case.noise, **extra)
    sigma = patcher.get_model_object("model_sampling").percent_to_sigma(0.4)
    with torch.no_grad():
        return model.apply_model(case.noise * 0.7, torch.tensor([sigma]), **{k: c.cond for k, c in conds.items()})


def targets(transformer) -> list[str]:
    """The Linears the family's LoRAs adapt by default, and the output projection besides."""
    pattern = re.compile(transformer.lora_targets)
    names = LoRANames(transformer).linears
    return [n for n in names if pattern.fullmatch(n)] + [list(names)[-1]]


def random_lora(transformer, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets(transformer):
        m = LoRANames(transformer).linears[name]
        out[name] = (torch.randn(RANK, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, RANK, generator=g) * 0.1)
    return out


def write_lora(fmt: str, transformer, path: Path, seed: int = 0) -> Path:
    """A LoRA file in ``fmt``: ``ours`` (vdit_core's trainer's writer), ``peft`` (diffusers /
    PEFT keys, no alpha), ``peft_header`` (alpha in diffusers' header only), ``kohya``, or
    ``tencent`` (HunyuanDiT's original module names, q/k/v and k/v fused)."""
    tensors, meta = {}, None
    if fmt == "ours":
        lora = inject_lora(transformer, rank=RANK, alpha=ALPHA, targets="|".join(re.escape(n) for n in targets(transformer)))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, adapter in lora.items():  # (as if trained: B is 0 at the start)
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.1)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
        save_lora(lora, path, base_model="tiny")
        lora.detach()
        return path
    if fmt == "tencent":
        g = torch.Generator().manual_seed(seed)
        names = LoRANames(transformer)
        for original in transformer.lora_original_names():
            ours = names.targets(original)
            if not set(ours) & set(targets(transformer)):
                continue
            rows = sum(names.linears[t].out_features for t in ours)
            tensors[f"base_model.model.{original}.lora_A.weight"] = torch.randn(RANK, names.linears[ours[0]].in_features, generator=g) * 0.1
            tensors[f"base_model.model.{original}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.1
        save_file(tensors, str(path))
        return path
    for name, (a, b) in random_lora(transformer, seed).items():
        if fmt in ("peft", "peft_header"):
            tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = a, b
        elif fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a, b
            tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
        else:
            raise ValueError(fmt)
    if fmt == "peft_header":
        meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
    save_file(tensors, str(path), metadata=meta)
    return path


def comfy_lora(patcher, path: Path, strength: float):
    """LoraLoaderModelOnly's call: the file as ComfyUI reads it, then load_lora_for_models."""
    return comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True), strength, 0)[0]


def vdit_reference(patcher, case, path: Path, strength: float) -> torch.Tensor:
    """The unpatched model's output with vdit_core's LoRA attached to its transformer."""
    handle = load_lora(case.transformer, path, strength)
    try:
        return denoised(patcher, case)
    finally:
        handle.detach()


def left_out(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and any(s in r.getMessage() for s in NOT_LOADED)]


FORMATS = [(name, fmt) for name in FAMILIES for fmt in ("ours", "peft", "kohya")] + [("hunyuandit-v1.2", "tencent")]


@pytest.mark.parametrize("name,fmt", FORMATS)
def test_comfyui_lora_loading_matches_vdit(name, fmt, tmp_path, caplog):
    """Every key of the file loads; strength 0 is exactly the plain model; strength 1 and 0.5 give
    vdit_core's own LoRA output within 1e-5; the plain model is unchanged afterwards."""
    case = native_cases.case(name)
    patcher = native.native_model(case.transformer, case.family, None, name, case.defaults)
    path = write_lora(fmt, case.transformer, tmp_path / f"{fmt}.safetensors")
    base = denoised(patcher, case)
    with caplog.at_level(logging.WARNING):
        zero = comfy_lora(patcher, path, 0.0)
        one = comfy_lora(patcher, path, 1.0)
        half = comfy_lora(patcher, path, 0.5)
    assert left_out(caplog) == []
    modules = len(LoRANames(case.transformer).linears)
    patched = len(one.patches)
    assert patched == len(targets(case.transformer)) <= modules
    assert torch.equal(denoised(zero, case), base)
    got_one, got_half = denoised(one, case), denoised(half, case)
    ref_one, ref_half = vdit_reference(patcher, case, path, 1.0), vdit_reference(patcher, case, path, 0.5)
    err = max((got_one - ref_one).abs().max().item(), (got_half - ref_half).abs().max().item())
    effect = (ref_one - base).abs().max().item()
    REPORT[f"native LoRA {name} {fmt}: max |ComfyUI patch - vdit hook|"] = f"{err:.1e} (LoRA effect {effect:.2f}, {patched} weights)"
    assert effect > 1e-2 and err < 1e-5
    assert torch.equal(denoised(patcher, case), base)  # the plain model again: ComfyUI unpatched its weights


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_on_castable_layers_under_a_low_vram_load(name, tmp_path):
    """With the layers ComfyUI's cast layers (as on a GPU) and a low-VRAM load of 1 byte, ComfyUI
    applies the LoRA to each streamed layer as it runs: the output of a full load with the LoRA."""
    case = native_cases.case(name)
    native.castable(case.transformer)
    patcher = native.native_model(case.transformer, case.family, None, name, case.defaults)
    lora = comfy_lora(patcher, write_lora("ours", case.transformer, tmp_path / "lora.safetensors"), 1.0)
    full = denoised(lora, case)
    comfy.model_management.unload_all_models()
    cpu = torch.device("cpu")
    lora.load(cpu, lowvram_model_memory=1)
    streamed = [m for m in case.transformer.modules() if getattr(m, "comfy_cast_weights", False) and m.weight_function]
    assert len(streamed) == len(targets(case.transformer))  # every LoRA-patched layer got its patch as a function
    assert (loaded_denoised(lora, case) - full).abs().max().item() < 1e-5
    lora.detach()


def test_float8_layers_stream_under_a_low_vram_load_with_a_lora_or_not(tmp_path):
    """vdit's float8 layers become castable too (as on a GPU): a low-VRAM load of 1 byte streams
    them with their scales and gives the full load's output exactly; with a LoRA, each streamed
    float8 layer gets its patch as a function, rounded into float8 with the full load's seeds, so
    the output is the full load's again."""
    from vdit_core.fp8 import FP8Linear, quantize

    case = native_cases.case("cogvideox-5b")
    n8 = quantize(case.transformer, case.transformer.transformer_blocks)
    native.castable(case.transformer)
    assert n8 > 0 and sum(isinstance(m, native.CastFP8Linear) for m in case.transformer.modules()) == n8
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    cpu = torch.device("cpu")
    for model in (patcher, comfy_lora(patcher, write_lora("peft", case.transformer, tmp_path / "peft.safetensors"), 1.0)):
        full = denoised(model, case)
        comfy.model_management.unload_all_models()
        model.load(cpu, lowvram_model_memory=1)
        fp8 = [m for m in case.transformer.modules() if isinstance(m, FP8Linear)]
        assert all(m.comfy_cast_weights for m in fp8)  # streamed, not left behind
        if model is not patcher:
            patched = [m for m in fp8 if m.weight_function]
            assert 0 < len(patched) <= len(targets(case.transformer))
        assert torch.equal(loaded_denoised(model, case), full)
        model.detach()


def test_tencent_fused_names_equal_ours_split():
    """The key map sends Tencent's fused q/k/v and k/v of HunyuanDiT to row slices of our split
    projections, and every other original name to our module's weight."""
    case = native_cases.case("hunyuandit-v1.2")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    d = case.transformer.config.hidden_size
    qkv = key_map["base_model.model.blocks.1.attn1.Wqkv"]
    assert list(qkv) == [(native.weight_key(f"blocks.1.attn1.to_{x}"), i * d, d) for i, x in enumerate("qkv")]
    assert [p[0] for p in key_map["base_model.model.blocks.1.attn2.kv_proj"]] == [native.weight_key(f"blocks.1.attn2.to_{x}") for x in "kv"]
    assert key_map["base_model.model.blocks.1.mlp.fc1"] == native.weight_key("blocks.1.ff.net.0.proj")
    assert key_map["blocks.1.attn2.q_proj"] == native.weight_key("blocks.1.attn2.to_q")


@pytest.mark.parametrize("name", FAMILIES)
def test_key_map_holds_every_name_vdit_reads(name):
    """ComfyUI's key map of a native model maps every spelling vdit_core's reader resolves, for
    every Linear, to that module's weight (a key of the model's state dict); ComfyUI's own
    entries stay."""
    case = native_cases.case(name)
    patcher = native.native_model(case.transformer, case.family, None, name, case.defaults)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    sd = patcher.model.state_dict()
    names = LoRANames(case.transformer)
    for linear in names.linears:
        weight = native.weight_key(linear)
        assert weight in sd
        spellings = [linear, f"diffusion_model.{linear}", f"transformer.{linear}", f"base_model.model.{linear}",
                     "lora_unet_" + linear.replace(".", "_"), "lora_transformer_" + linear.replace(".", "_")]
        assert all(key_map[s] == weight for s in spellings)
        assert key_map[weight.removesuffix(".weight")] == weight  # ComfyUI's generic name of the weight
    for spelling, value in key_map.items():
        parts = value if isinstance(value, native.RowSplit) else [(value,)]
        assert all(p[0] in sd for p in parts), spelling


def test_lora_of_another_family_is_reported_and_not_applied(tmp_path, caplog):
    """A CogVideoX LoRA on the HunyuanDiT model: ComfyUI reports every key as not loaded and vdit
    says once which model it does not fit; nothing is patched, the output is the plain model's."""
    cog = native_cases.case("cogvideox-5b")
    path = write_lora("ours", cog.transformer, tmp_path / "cog.safetensors")
    case = native_cases.case("hunyuandit-v1.2")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    base = denoised(patcher, case)
    with caplog.at_level(logging.WARNING):
        patched = comfy_lora(patcher, path, 1.0)
    messages = left_out(caplog)
    keys = comfy.utils.load_torch_file(str(path))
    assert sum("lora key not loaded" in m for m in messages) == len(keys)
    vdit = [m for m in messages if m.startswith("vdit:")]
    assert len(vdit) == 1 and f"Of its {len(targets(cog.transformer))} modules" in vdit[0] and "not in this vdit HunyuanDiT transformer" in vdit[0]
    assert "1 have other shapes (e.g. diffusion_model.proj_out: 16x32, the model's 32x16)" in vdit[0]  # (a name both families use)
    assert patched.patches == {}
    assert torch.equal(denoised(patched, case), base)


def test_lora_of_another_size_is_refused_before_sampling(tmp_path, caplog):
    """Module names that exist but matrices of another size (a 2B LoRA on a 5B, say) are left out
    at load with one warning, not patched (ComfyUI would log an error at every sampling)."""
    case = native_cases.case("cogvideox-5b")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    good = write_lora("peft", case.transformer, tmp_path / "good.safetensors")
    sd = comfy.utils.load_torch_file(str(good))
    sd["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 7)
    with caplog.at_level(logging.WARNING):
        patched = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0)[0]
    vdit = [m for m in left_out(caplog) if m.startswith("vdit:")]
    assert len(vdit) == 1 and "1 have other shapes" in vdit[0] and "transformer.transformer_blocks.0.attn1.to_q" in vdit[0]
    assert native.weight_key("transformer_blocks.0.attn1.to_q") not in patched.patches
    assert len(patched.patches) == len(targets(case.transformer)) - 1
    comfy.model_management.load_models_gpu([patched])
    assert not [r for r in caplog.records if r.getMessage().startswith("ERROR")]


def test_diffusers_header_alpha_is_not_read_by_comfyui(tmp_path, caplog):
    """diffusers keeps a PEFT LoRA's alpha in the safetensors header, which ComfyUI does not read
    (its rule: no ``.alpha`` key, scale 1): such a file applies in ComfyUI as in vdit_core at
    ``strength * rank / alpha``. Documented, not fixed: ComfyUI hands the loader no header."""
    case = native_cases.case("opensora")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    path = write_lora("peft_header", case.transformer, tmp_path / "header.safetensors")
    got = denoised(comfy_lora(patcher, path, 1.0), case)
    ref = vdit_reference(patcher, case, path, RANK / ALPHA)
    assert (got - ref).abs().max().item() < 1e-5


def test_lora_loader_model_only_node(tmp_path, caplog):
    """ComfyUI's LoraLoaderModelOnly node on a file in models/loras."""
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    case = native_cases.case("cogvideox-5b")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    path = write_lora("ours", case.transformer, tmp_path / "vdit_trained.safetensors")
    with caplog.at_level(logging.WARNING):
        (model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, path.name, 0.8)
    assert left_out(caplog) == []
    assert (denoised(model, case) - vdit_reference(patcher, case, path, 0.8)).abs().max().item() < 1e-5


def test_float8_layers_get_the_patch_in_their_stored_units(tmp_path):
    """A transformer whose blocks hold float8 weights (vdit_core.fp8: weight / scale stored): the
    patch is divided by the layer's scale before ComfyUI rounds it into the float8 weight, so the
    LoRA's effect is kept (up to float8 rounding); strength 0 is still exactly the plain model."""
    from vdit_core.fp8 import quantize

    case = native_cases.case("cogvideox-5b")
    quantize(case.transformer, case.transformer.transformer_blocks)
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    path = write_lora("peft", case.transformer, tmp_path / "peft.safetensors")
    base = denoised(patcher, case)
    assert torch.equal(denoised(comfy_lora(patcher, path, 0.0), case), base)
    got = denoised(comfy_lora(patcher, path, 1.0), case)
    ref = vdit_reference(patcher, case, path, 1.0)
    err, effect = (got - ref).abs().max().item(), (ref - base).abs().max().item()
    REPORT["native LoRA cogvideox-5b float8 blocks: max |ComfyUI patch - vdit hook|"] = f"{err:.1e} (LoRA effect {effect:.2f})"
    assert err < 0.2 * effect
    assert torch.equal(denoised(patcher, case), base)


def test_hook_lora_on_conditioning_matches_the_lora_loader(tmp_path, caplog):
    """ComfyUI's hook LoRA (comfy.hooks: the weights patched while sampling the conditioning that
    carries the hook; CreateHookLora's path) reads the same key map and row splits: sampling with
    Tencent's fused LoRA as a hook on both prompts gives LoraLoader's result."""
    import comfy.hooks
    import comfy.sample

    case = native_cases.case("hunyuandit-v1.2")
    patcher = native.native_model(case.transformer, case.family, None, "x", case.defaults)
    path = write_lora("tencent", case.transformer, tmp_path / "tencent.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)

    def sample(model, hooks=None):
        pos, neg = (native.conditioning(case.family, c) for c in (case.cond, case.uncond))
        if hooks is not None:
            pos, neg = (comfy.hooks.set_hooks_for_conditioning(c, hooks) for c in (pos, neg))
        with torch.no_grad():
            return comfy.sample.sample(model, case.noise, 3, case.cfg, "euler", "simple", pos, neg, torch.zeros_like(case.noise), seed=0, disable_pbar=True)

    plain = sample(patcher)
    with caplog.at_level(logging.WARNING):
        hooked = sample(patcher, comfy.hooks.create_hook_lora(lora, 1.0, 0.0))
        loader = sample(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0])
    assert left_out(caplog) == []
    err = (hooked - loader).abs().max().item()
    REPORT["native LoRA hunyuandit tencent as a conditioning hook: max |hook - LoraLoader| after 3 steps"] = f"{err:.1e}"
    assert (loader - plain).abs().max().item() > 1e-2 and err < 1e-5
