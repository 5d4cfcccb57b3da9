"""torch.compile as a GPU user runs it, checked on a CPU with backends that record what dynamo
captures (no code generation): the supported torch versions, RoPE without complex tensors in
compiled code (inductor generates none, and on CUDA a complex view of a non-contiguous slice
fails to compile), and LoRAs with compiled blocks (attached, detached and re-weighted per run,
seen by the compiled code, without recompiling)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file

from vdit_core import families
from vdit_core.demo import demo_model_path
from vdit_core.layers import rope_3d, rope_rotations, rotate_
from vdit_core.lora import load_lora
from vdit_core.pipeline import check_compiler, compile_blocks, load_pipeline


class Recorder:
    """A dynamo backend that keeps each captured graph and runs it as captured."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def complex_values(self) -> list[str]:
        """Nodes of the captured graphs whose value is a complex tensor."""
        out = []
        for gm in self.graphs:
            for node in gm.graph.nodes:
                v = node.meta.get("example_value")
                if isinstance(v, torch.Tensor) and v.is_complex():
                    out.append(f"{node.op} {node.target}")
        return out


def test_compile_needs_torch_2_5(monkeypatch):
    """Before 2.5 dynamo compiled each block on its own and gave up after 8 (of a model's 30-56)."""
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(ValueError, match=r"compile: needs PyTorch 2.5 or later \(this is 2.4.1\+cu121\)"):
        check_compiler("cuda")
    with pytest.raises(ValueError, match="compile: needs PyTorch 2.5 or later"):
        load_pipeline(demo_model_path(), device="cpu", compile=True)


def test_fsdp_needs_torch_2_6(monkeypatch, tmp_path):
    """FSDP2's public fully_shard is in torch 2.6: refused before any work on older torch."""
    from vdit_core.train import trainer

    monkeypatch.setattr(torch, "__version__", "2.5.1")
    monkeypatch.setattr(trainer.vdist, "world_size", lambda: 2)
    out = tmp_path / "out"
    code = trainer.main(["--model", str(demo_model_path()), "--data", str(tmp_path), "--output", str(out), "--full", "--strategy", "fsdp"])
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_compiles_to_real_arithmetic(dtype):
    """rotate_ on the video tokens of a [text; video] sequence, as CogVideoX calls it: the captured
    graph holds no complex tensor, in one graph, and gives the eager values."""
    cos, sin = rope_3d(16, 2, 3, 4, "slice", 3, 4)  # 24 video tokens
    rot = rope_rotations(cos, sin, "cpu")

    def rotate_video_tokens(q, rot):
        q = q * 1  # a fresh tensor, as q and k are in the models
        rotate_(q[:, 6:], rot)
        return q

    q = torch.randn(2, 30, 3, 16, dtype=dtype)
    torch._dynamo.reset()
    recorder = Recorder()
    compiled = torch.compile(rotate_video_tokens, backend=recorder, fullgraph=True)(q, rot)
    assert recorder.graphs and recorder.complex_values() == []
    eager = rotate_video_tokens(q, rot)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(compiled, eager, **tol)
    assert torch.equal(compiled[:, :6], q[:, :6])


@pytest.mark.parametrize("folder", ["demo", "opensora"])
def test_compiled_blocks_hold_no_complex_tensor(folder, tmp_path):
    """The demo (CogVideoX with RoPE) and Open-Sora (RoPE in its temporal blocks), each block
    compiled: no captured graph holds a complex tensor, and the output is the eager one."""
    import shutil
    from pathlib import Path

    if folder == "demo":
        path = demo_model_path()
        x, t, cond = torch.randn(2, 2, 5, 8, 8), torch.tensor([500.0, 300.0]), {"context": torch.randn(2, 16, 64)}
    else:
        fixture = Path(__file__).parent / "fixtures" / "opensora"
        path = tmp_path / "opensora"
        shutil.copytree(fixture / "transformer", path / "transformer")
        model = families.get("opensora").load_transformer(path / "transformer", torch.float32, "cpu")
        cfg = model.config
        x = torch.randn(2, cfg.in_channels, 3, 8, 8)
        t = torch.tensor([500.0, 300.0])
        cond = {"y": torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels), "fps": torch.tensor([24.0, 24.0])}
    family = families.for_folder(path) if folder == "demo" else families.get("opensora")
    load = (lambda: load_pipeline(path, device="cpu").transformer) if folder == "demo" else \
        (lambda: family.load_transformer(path / "transformer", torch.float32, "cpu"))
    eager, compiled = load(), load()
    torch._dynamo.reset()
    recorder = Recorder()
    compile_blocks(compiled, family, backend=recorder)
    with torch.no_grad():
        expected = eager(x, t, **cond)
        got = compiled(x, t, **cond)
    assert recorder.graphs and recorder.complex_values() == []
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _lora_file(model, path, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks.") and ".attn1.to_" in name:
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
    save_file(tensors, str(path))
    return str(path)


def test_loras_on_compiled_blocks_take_effect_without_recompiling(tmp_path):
    """What the Sampler node does on every run (load the LoRAs, sample, detach them), on a model
    whose blocks are compiled: the compiled output is the eager output with the same LoRA, at any
    strength, after detaching, and with a new LoRA of the same shapes; only the first run with a
    LoRA compiles (a graph with one adapter per layer, shared by all blocks)."""
    path = demo_model_path()
    family = families.for_folder(path)
    eager = load_pipeline(path, device="cpu").transformer
    compiled = load_pipeline(path, device="cpu").transformer
    torch._dynamo.reset()
    recorder = Recorder()
    compile_blocks(compiled, family, backend=recorder)
    x, t, ctx = torch.randn(2, 2, 5, 8, 8), torch.tensor([500.0, 300.0]), torch.randn(2, 16, 64)
    files = [_lora_file(eager, tmp_path / f"l{i}.safetensors", i) for i in range(2)]

    def run(lora: str | None, strength: float = 1.0) -> int:
        handles = [load_lora(m, lora, strength) for m in (eager, compiled)] if lora else []
        try:
            with torch.no_grad():
                expected, got = eager(x, t, ctx), compiled(x, t, ctx)
        finally:
            for h in handles:
                h.detach()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return len(recorder.graphs)

    with torch.no_grad():
        base = eager(x, t, ctx)
    plain = run(None)
    with_lora = run(files[0])
    assert with_lora > plain  # the first run with a LoRA compiles its graph once
    assert run(files[0]) == with_lora  # attached again for the next run: nothing recompiled
    assert run(files[1], 0.5) == with_lora  # another LoRA of the same shapes, another strength
    assert run(files[0], 0.0) == with_lora
    assert run(None) == with_lora  # detached: the plain graph again
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, ctx), base, atol=1e-5, rtol=1e-5)


def test_a_lora_on_a_block_compiled_without_its_hook_is_refused(tmp_path):
    """A block compiled by hand (not by compile_blocks) has no LoRA hook, and compiled code would
    never see one added later: attaching a LoRA there is an error, not a silent no-op."""
    model = load_pipeline(demo_model_path(), device="cpu").transformer
    lora = _lora_file(model, tmp_path / "l.safetensors", 0)
    model.transformer_blocks[0].compile(backend=Recorder())
    with pytest.raises(ValueError, match="transformer_blocks.0.attn1.to_.*compiled without the LoRA hook"):
        load_lora(model, lora, 1.0)
