"""LoRA files of every supported format, applied non-destructively."""

import json

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

import tiny  # noqa: E402
from vdit_core.checkpoint import CheckpointError  # noqa: E402
from vdit_core.families.cogvideox import LORA_TARGETS as DEFAULT_TARGETS  # noqa: E402
from vdit_core.lora import attached_loras, inject_lora, load_lora, read_lora, save_lora, unload_loras  # noqa: E402
from vdit_core.models.cogvideox import load_transformer  # noqa: E402


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.CogVideoXTransformer3DModel(**tiny.transformer_kwargs("5b")).eval()
    d = tmp_path_factory.mktemp("lora_base") / "transformer"
    ref.save_pretrained(str(d))
    return ref, load_transformer(d), d


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 3, 4, 6, generator=g), torch.tensor([500.0]), torch.randn(1, 226, tiny.TEXT_DIM, generator=g)


def _random_lora(model, rank=3, names=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (names is None or name in names) and "attn1.to_" in name:
            out[name] = (torch.randn(rank, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, rank, generator=g) * 0.1)
    return out


def _merged_output(folder, lora, scale):
    """Reference: a fresh model with W + scale * B @ A merged into its weights."""
    model = load_transformer(folder)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.items():
            mods[name].weight += scale * b @ a
        return model(*_reorder(_inputs()))


def _reorder(inp):
    x, t, ctx = inp
    return x, t, ctx


@pytest.mark.parametrize("fmt", ["ours", "diffusers", "kohya", "peft_prefix"])
def test_lora_formats_match_merged_weights(model_pair, tmp_path, fmt):
    _, model, folder = model_pair
    lora = _random_lora(model)
    rank, alpha = 3, 6.0
    tensors, meta = {}, None
    for name, (a, b) in lora.items():
        if fmt == "ours":
            tensors[f"diffusion_model.{name}.lora_A.weight"] = a
            tensors[f"diffusion_model.{name}.lora_B.weight"] = b
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
        elif fmt == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
            meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
        elif fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = a
            tensors[f"{stem}.lora_up.weight"] = b
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=meta)
    scale = 1.0 if fmt == "peft_prefix" else alpha / rank  # no alpha anywhere: scale 1 (ComfyUI's rule)
    expected = _merged_output(folder, lora, scale * 0.7)
    handle = load_lora(model, path, strength=0.7)
    try:
        with torch.no_grad():
            got = model(*_inputs())
    finally:
        handle.detach()
    assert (got - expected).abs().max() < 1e-5


def test_diffusers_peft_adapter_file_matches_diffusers(model_pair, tmp_path):
    """A LoRA trained/saved through diffusers + PEFT gives diffusers' own output in vdit."""
    peft = pytest.importorskip("peft")
    ref, model, folder = model_pair
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(str(folder)).eval()
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    out_dir = tmp_path / "peft_lora"
    diffusers.CogVideoXPipeline.save_lora_weights(
        str(out_dir), transformer_lora_layers=peft.get_peft_model_state_dict(ref),
        transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
    )
    x, t, ctx = _inputs()
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    crops = get_resize_crop_region_for_grid((2, 3), 3, 2)
    rope = get_3d_rotary_pos_embed(16, crops, (2, 3), 3)
    with torch.no_grad():
        expected = ref(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=ctx, timestep=t.long(),
                       image_rotary_emb=rope, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    handle = load_lora(model, out_dir / "pytorch_lora_weights.safetensors")
    try:
        with torch.no_grad():
            got = model(x, t, ctx)
    finally:
        handle.detach()
    assert (got - expected).abs().max() < 1e-5


def test_non_destructive_stacking_and_strength_zero(model_pair, tmp_path):
    _, model, _ = model_pair
    with torch.no_grad():
        base = model(*_inputs())
    paths = []
    for i in range(2):
        lora = _random_lora(model, seed=i)
        t = {}
        for name, (a, b) in lora.items():
            t[f"diffusion_model.{name}.lora_A.weight"], t[f"diffusion_model.{name}.lora_B.weight"] = a, b
        paths.append(tmp_path / f"l{i}.safetensors")
        save_file(t, str(paths[-1]))
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        h0 = load_lora(model, paths[0], 0.0)
        assert torch.equal(model(*_inputs()), base)  # strength 0: the base output exactly
        h0.strength = 1.0
        one = model(*_inputs())
        h1 = load_lora(model, paths[1], 1.0)
        both = model(*_inputs())
        h1.detach()
        assert torch.equal(model(*_inputs()), one)
        load_lora(model, paths[1], 1.0)
        assert len(attached_loras(model)) == 2
        unload_loras(model)
        assert torch.equal(model(*_inputs()), base)  # removing restores exactly
    assert not torch.equal(one, base) and not torch.equal(both, one)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(weights_before)


def test_lora_for_another_model_is_an_error(model_pair, tmp_path):
    _, model, _ = model_pair
    bad = tmp_path / "other.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(8, 4)}, str(bad))
    with pytest.raises(CheckpointError, match=r"a LoRA for another model.*double_blocks"):
        load_lora(model, bad)
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)}, str(wrong_shape))
    with pytest.raises(CheckpointError, match=r"a LoRA for another model"):
        load_lora(model, wrong_shape)
    not_lora = tmp_path / "plain.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.norm1.conv_y.conv.weight": torch.zeros(1)}, str(not_lora))
    with pytest.raises(CheckpointError, match="expected a LoRA, but this looks like a CogVideoX VAE"):
        load_lora(model, not_lora)
    assert attached_loras(model) == []  # nothing half-applied


def test_trained_adapters_save_and_reload(model_pair, tmp_path):
    _, model, _ = model_pair
    lora = inject_lora(model, rank=4, alpha=8)
    names = [n for n, _ in lora.items()]
    assert len(names) == 2 * 6 and all("attn1.to_" in n or "ff.net" in n for n in names)  # 2 blocks x (q,k,v,out,ff0,ff2)
    with torch.no_grad():
        for _, a in lora.items():
            a.lora_B.normal_(0, 0.1)
        trained = model(*_inputs())
    path = save_lora(lora, tmp_path / "ours.safetensors", base_model="tiny-5b")
    lora.detach()
    entries, meta = read_lora(path, model)
    assert meta["vdit_format"] == "vdit-lora-v1" and meta["vdit_rank"] == "4" and meta["vdit_targets"] == DEFAULT_TARGETS
    assert all(scale == 2.0 for _, _, scale in entries.values())
    h = load_lora(model, path)
    with torch.no_grad():
        assert (model(*_inputs()) - trained).abs().max() < 1e-6
    h.detach()
