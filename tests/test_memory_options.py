"""The memory options: float8 weights (vdit_core.fp8: quantised at load, and the fp8 files users
already have: ComfyUI's scaled fp8 and plain casts), and block swap (vdit_core.offload). Block swap
saves memory only on a GPU; here its bookkeeping runs on the CPU (copies instead of transfers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from vdit_core import families
from vdit_core.checkpoint import load_state_dict
from vdit_core.demo import demo_model_path
from vdit_core.models.cogvideox import load_transformer
from vdit_core.fp8 import FP8Linear, check_support, quantize, quantize_weight, round_stochastic
from vdit_core.pipeline import load_pipeline

E4M3 = torch.float8_e4m3fn
COG = families.get("cogvideox")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_quantised_weights_are_within_float8_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * 0.02
    q, scale = quantize_weight(w)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.ndim == 0
    back = q.float() * scale
    assert float(back.abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-6)  # the largest maps exactly
    normal = w.abs() > scale * 2**-6  # e4m3's normal range: 3 mantissa bits, half a step of relative error
    assert ((back - w).abs()[normal] <= w.abs()[normal] * 2**-4 + 1e-12).all()
    assert 0 < float((back - w).abs().max()) < float(w.abs().max()) * 2**-4

    lin = FP8Linear(48, 64, device="cpu")
    lin.weight.data, lin.scale_weight, lin.bias.data = q, scale, torch.randn(64)
    x = torch.randn(3, 48)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, q.float() * scale, lin.bias))
    assert lin(x.bfloat16()).dtype == torch.bfloat16  # computes in the input's dtype


def test_the_float8_scale_is_applied_in_float32():
    """The float32 scale of a float8 weight multiplies it in float32, then the product is rounded
    once to the compute dtype: the scale cast to bf16 first (or, on CUDA, a bf16 weight times the
    float32 scale tensor, which the kernel casts to bf16) scales a whole layer by the scale's
    rounding error, up to 0.2%. Checked by the values and by the dtypes each multiplication runs
    in (a CPU cannot show the CUDA kernel's cast)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vdit_core.fp8 import adopt

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mul", "mul_"):
                self.dtypes.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(64, 48) * 0.02)
    scale = scale * (1 + 3 * 2**-10)  # well between two bf16 values
    assert scale.bfloat16().float() != scale
    lin = FP8Linear(48, 64, bias=False, device="cpu")
    lin.weight.data, lin.scale_weight = q, scale
    for dtype in (torch.bfloat16, torch.float16):
        with Products() as products:
            w = lin.dequantized(dtype)
        assert products.dtypes and all(d == (torch.float32, torch.float32) for d in products.dtypes), products.dtypes
        assert w.dtype == dtype and torch.equal(w, (q.float() * scale).to(dtype))

    # a scaled weight that is not a linear layer's float8 one is dequantised when loaded, alike
    model = nn.Module()
    model.table = nn.Embedding(64, 48, device="meta")
    sd = adopt(model, {"table.weight": q, "table.scale_weight": scale}, torch.bfloat16)
    assert torch.equal(sd["table.weight"], (q.float() * scale).to(torch.bfloat16))


@pytest.fixture(scope="module")
def demo_runs():
    kw = dict(prompt="a blue square moving up on a dark background", steps=12, seed=0, progress=False)
    plain = load_pipeline(demo_model_path(), device="cpu")
    small = load_pipeline(demo_model_path(), device="cpu", fp8=True)
    return plain, small, kw


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_stochastic_rounding_keeps_float8_values_and_is_unbiased(dtype):
    """round_stochastic (how a float8 layer stores a patched weight, FP8Linear.set_weight): every
    float8 value comes back exactly; others go to a neighbour, unbiased on average; out of range
    clamps."""
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    every = every[torch.isfinite(every)]
    assert torch.equal(round_stochastic(every, dtype, seed=1).float(), every)
    x = torch.full((100_000,), 0.3)
    r = round_stochastic(x, dtype, seed=2).float()
    assert len(set(r.tolist())) == 2 and abs(r.mean().item() - 0.3) < 1e-3  # (0.3 is no float8 value)
    big = torch.finfo(dtype).max
    assert round_stochastic(torch.tensor([10 * big, -10 * big]), dtype).float().tolist() == [big, -big]
    lin = FP8Linear(4, 3, device="cpu", weight_dtype=dtype)
    lin.weight.data = every[:12].reshape(3, 4).to(dtype)
    before = lin.weight.clone()
    lin.set_weight(lin.weight.float(), seed=0)
    assert torch.equal(lin.weight.float(), before.float()) and lin.weight.dtype == dtype


def test_fp8_pipeline_stores_block_linears_in_float8_and_stays_close(demo_runs):
    plain, small, kw = demo_runs
    blocks = [m for b in COG.blocks(small.transformer) for m in b.modules() if isinstance(m, nn.Linear)]
    assert blocks and all(isinstance(m, FP8Linear) and m.weight.dtype == E4M3 for m in blocks)
    # outside the blocks (embeddings, output) nothing changed
    assert not isinstance(small.transformer.proj_out, FP8Linear) and small.transformer.proj_out.weight.dtype == torch.float32
    size = lambda t: sum(p.numel() * p.element_size() for p in t.parameters())  # noqa: E731
    assert size(small.transformer) < 0.5 * size(plain.transformer)  # fp32 -> fp8 in the blocks
    a, b = plain(**kw), small(**kw)
    assert not torch.equal(a, b)
    assert _psnr(a, b) > 30, _psnr(a, b)


def _saved(tmp_path, name, sd):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_comfyui_scaled_fp8_and_plain_fp8_files_load_as_float8(tmp_path, demo_runs):
    _, small, _ = demo_runs
    sd = load_state_dict(demo_model_path() / "transformer")
    model = COG.load_transformer(demo_model_path() / "transformer", dtype=torch.float32, device="cpu")
    block_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")}

    # ComfyUI's scaled fp8: block linears as float8 + float32 scale_weight (+ scale_input), the marker, the rest as it was
    scaled = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, v in sd.items():
        layer = k.rsplit(".", 1)[0]
        if layer in block_linears and k.endswith(".weight"):
            scaled[k], scaled[layer + ".scale_weight"] = quantize_weight(v)
            scaled[layer + ".scale_input"] = torch.ones(())
        else:
            scaled[k] = v
    loaded = load_transformer(_saved(tmp_path, "scaled.safetensors", scaled), dtype=torch.bfloat16, config=model.config)
    fp8_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, FP8Linear)}
    assert set(fp8_layers) == block_linears
    assert all(m.scale_weight.dtype == torch.float32 for m in fp8_layers.values())  # not rounded to bf16
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 3, 8, 8)
    ctx = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim)
    t = torch.tensor([500.0])
    # the same float8 weights as quantising at load: the same output, here in float32 (scales exact)
    loaded32 = load_transformer(_saved(tmp_path, "scaled32.safetensors", scaled), config=model.config)
    with torch.no_grad():
        assert torch.equal(loaded32(x, t, ctx), small.transformer(x, t, ctx))
        assert loaded(x, t, ctx).dtype == torch.bfloat16

    # a plain cast: every tensor float8, no scales: linear layers keep float8 (scale 1), the rest is dequantised
    plain = {k: v.to(E4M3) for k, v in sd.items()}
    cast = load_transformer(_saved(tmp_path, "cast.safetensors", plain), config=model.config)
    assert isinstance(cast.proj_out, FP8Linear) and float(cast.proj_out.scale_weight) == 1.0
    assert cast.norm_final.weight.dtype == torch.float32 and cast.patch_embed.proj.weight.dtype == torch.float32
    with torch.no_grad():
        out = cast(x, t, ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fp8_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="fp8: float8 weights are not supported on mps; use cpu or cuda"):
        check_support("mps")
    model = nn.Sequential(nn.Linear(4, 4))
    assert quantize(model, [model]) == 1 and isinstance(model[0], FP8Linear)


def test_a_lora_runs_on_float8_weights(tmp_path, demo_runs):
    """LoRA adapters on float8 layers compute in the activations' dtype; strength 0 is the base."""
    from vdit_core.lora import inject_lora, save_lora

    _, small, kw = demo_runs
    lora = inject_lora(small.transformer, rank=2)
    with torch.no_grad():
        for a in lora.adapters.values():
            a.lora_B.normal_(0, 0.05)
    path = tmp_path / "l.safetensors"
    save_lora(lora, path)
    small.unload_loras()
    base = small(**kw)
    handle = small.load_lora(path, 1.0)
    assert all(a.lora_A.dtype == torch.float32 for a in handle.adapters.values())
    assert not torch.equal(small(**kw), base)
    small.unload_loras()
    assert torch.equal(small(**kw), base)


def test_block_swap_streams_blocks_and_gives_the_plain_output(demo_runs):
    from vdit_core.offload import BlockSwap

    plain, _, kw = demo_runs
    pipe = load_pipeline(demo_model_path(), device="cpu")
    blocks = list(COG.blocks(pipe.transformer))
    swap = BlockSwap(pipe.transformer, blocks, "cpu", resident=2)
    host = {h.data_ptr() for held in swap.host for h in held}
    seen = []
    for b in blocks[2:]:  # what each streamed block runs with (hooks after the swap's)
        b.register_forward_pre_hook(lambda m, a: seen.append(all(p.data_ptr() not in host for p in m.parameters())))
    out = pipe(**kw)
    assert torch.equal(out, plain(**kw))
    assert seen and all(seen)  # streamed blocks ran on device copies, never on the CPU-held weights
    held = {h.data_ptr() for h in swap.host[0]}
    assert all(p.data_ptr() in held for p in blocks[2].parameters())  # and went back to them after running
    swap.detach()
    with pytest.raises(ValueError, match=r"gpu_blocks=7: the model has 6 blocks; use 0..6"):
        BlockSwap(pipe.transformer, blocks, "cpu", resident=7)


def _tiny_transformers():
    """A tiny transformer of each family with inputs for its forward (positional, keyword)."""
    import tiny
    from vdit_core.models import cogvideox, hunyuan_dit, opensora

    torch.manual_seed(0)
    cog = cogvideox.CogVideoXTransformer(cogvideox.CogVideoXConfig.from_diffusers(tiny.transformer_kwargs("5b")))
    hy = hunyuan_dit.HunyuanDiT(hunyuan_dit.HunyuanDiTConfig(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, num_layers=4, mlp_ratio=2.5, cross_attention_dim=12,
        cross_attention_dim_t5=tiny.TEXT_DIM, pooled_projection_dim=8, text_len=5, text_len_t5=6, sample_size=8))
    stdit = opensora.STDiT3(opensora.STDiT3Config(hidden_size=32, depth=2, num_heads=2, caption_channels=16, model_max_length=9))
    t = torch.tensor([500.0, 20.0])
    return {
        "cogvideox": (cog, (torch.randn(2, 4, 3, 4, 6), t, torch.randn(2, 7, tiny.TEXT_DIM)), {}),
        "hunyuandit": (hy, (torch.randn(2, 4, 1, 6, 8), t, torch.randn(2, 5, 12), torch.ones(2, 5), torch.randn(2, 6, tiny.TEXT_DIM),
                            torch.ones(2, 6)), {}),
        "opensora": (stdit, (torch.randn(2, 4, 3, 4, 6), t, torch.randn(2, 9, 16)), {"fps": 24.0}),
    }


@pytest.mark.parametrize("family", ["cogvideox", "hunyuandit", "opensora"])
def test_step_cache_signal_runs_on_the_streamed_first_blocks_device_copy(family):
    """With a step cache, each step starts with the first block's modulated input, computed by
    a part of the block (its norm1) outside the block's forward. With every block streamed
    (gpu_blocks=0, or the automatic count at 0) the swap's hooks had not brought that block's
    weights, so on a GPU its CPU-held weights met CUDA inputs at step 1. Here: the first block's
    weights at every norm1 call are its device copies, never the ones held in CPU memory."""
    from vdit_core.offload import BlockSwap
    from vdit_core.step_cache import StepCache

    model, args, kwargs = _tiny_transformers()[family]
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised gates would hide the blocks
            p.add_(torch.randn_like(p) * 0.05)
        plain = model(*args, **kwargs)
    blocks = list(families.for_transformer(model).blocks(model))
    swap = BlockSwap(model, blocks, "cpu", resident=0)
    held = {id(p): p.data_ptr() for p in blocks[0].parameters()}  # at rest: the CPU-held weights
    seen = []
    blocks[0].norm1.register_forward_pre_hook(
        lambda m, a: seen.append(all(p.data_ptr() != held[id(p)] for p in blocks[0].parameters())))
    model.step_cache = StepCache(threshold=0.1)
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert len(seen) == 2 and all(seen), seen  # the signal's call, then the block's own
    assert all(p.data_ptr() == held[id(p)] for p in blocks[0].parameters())  # back to the CPU-held ones after
    assert torch.equal(out, plain)
    swap.detach()


def test_block_swap_budget_and_refusals():
    from vdit_core.offload import blocks_that_fit, check_block_swap

    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)], nn.Linear(16, 4, bias=False))
    blocks = list(model)[:8]  # 1 KiB each; the rest 256 B
    assert blocks_that_fit(model, blocks, free=9448, reserve=1000) is None  # 8448 B + reserve fits
    assert blocks_that_fit(model, blocks, free=9447, reserve=1000) == 4  # 9447 - 1000 - 256 - 3 x 1024 = 5119
    # 5000 free - 1000 reserve - 256 other - 3 x 1024 streamed = 672: no block stays
    assert blocks_that_fit(model, blocks, free=5000, reserve=1000) == 0
    assert blocks_that_fit(model, blocks, free=6000, reserve=1000) == 1
    with pytest.raises(ValueError, match="gpu_blocks=2: block swap streams blocks from CPU memory to a CUDA GPU; the device is cpu"):
        check_block_swap("cpu", 2)
    with pytest.raises(ValueError, match="gpu_blocks=-1: the number of transformer blocks kept on the GPU must be a whole number >= 0"):
        check_block_swap("cuda", -1)
    with pytest.raises(ValueError, match="gpu_blocks=2: block swap"):
        load_pipeline(demo_model_path(), device="cpu", gpu_blocks=2)


def test_vae_tiles_are_sized_from_free_memory(monkeypatch):
    """Untiled when the decode fits; else the largest tiles estimated to fit, and the pipeline's
    decode (and the nodes') ask the free memory at decode time."""
    import vdit_core.vae.common as vae_common

    pipe = load_pipeline(demo_model_path(), device="cpu")
    vae = pipe.vae
    f, h, w = 17, 64, 64
    need = vae.decode_bytes(f, h, w)
    assert vae.tiling_for_memory(f, h, w, None) is None and vae.tiling_for_memory(f, h, w, need) is None
    tiles = vae.tiling_for_memory(f, h, w, need // 3)
    assert tiles is not None and tiles.tile_height < h and tiles.tile_height % vae.spatial_compression == 0
    assert vae.decode_bytes(f, tiles.tile_height, tiles.tile_width) <= need // 3
    floor = vae.tiling_for_memory(f, h, w, 1)  # nothing fits: the smallest tiles, and the caller's retry
    assert floor.tile_height == max(2 * vae.spatial_compression, vae.default_tiling().tile_height // 4 // 8 * 8)

    seen = []
    real = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, **kw: seen.append(kw.get("tiling")) or real(z, **kw))
    kw = dict(prompt="a red circle moving right", steps=2, seed=0, progress=False)
    plain = pipe(**kw)
    monkeypatch.setattr(vae_common, "available_bytes", lambda device: need // 3)
    tiled = pipe(**kw, check_memory=False)
    assert seen[0] is None and seen[1] == tiles
    assert tiled.shape == plain.shape and (tiled - plain).abs().mean() < 0.05


def test_cli_fp8_and_block_swap(tmp_path, capsys):
    from vdit_core.generate import main

    out = tmp_path / "fp8.mp4"
    assert main(["--prompt", "a red circle moving right", "--steps", "3", "--fp8", "--out", str(out)]) == 0 and out.is_file()
    capsys.readouterr()
    # block swap off CUDA: one line, before anything loads or is written
    bad = tmp_path / "swap.mp4"
    assert main(["--prompt", "x", "--gpu-blocks", "2", "--device", "cpu", "--out", str(bad)]) == 2 and not bad.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: gpu_blocks=2: block swap streams blocks from CPU memory to a CUDA GPU; the device is cpu (leave it unset)"]


def test_each_familys_blocks_are_listed_in_the_order_they_run():
    """Block swap keeps the first blocks and prefetches the next one in this order."""
    import test_parallel

    jobs = test_parallel._forward_jobs()
    for name in ("cogvideox-5b", "hunyuandit-6x8", "opensora-8x12"):
        job = jobs[name]
        model = job["model"]
        listed = list(families.for_transformer(model).blocks(model))
        ran = []
        handles = [b.register_forward_pre_hook(lambda m, a: ran.append(m)) for b in listed]
        with torch.no_grad():
            model(*job["args"], **job["kwargs"])
        for h in handles:
            h.remove()
        assert len(ran) == len(listed) and all(a is b for a, b in zip(ran, listed)), name
