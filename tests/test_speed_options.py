"""The speed options. Step caching (vdit_core.step_cache) for every family: off below any change
(the uncached result exactly), everything after the first step skipped above any, and between the
two a result close to the uncached one; bad thresholds refused. Regional torch.compile: the eager
result within float rounding, refused without a compiler."""

from __future__ import annotations

import pytest
import torch

from vdit_core.demo import demo_model_path
from vdit_core.pipeline import load_pipeline
from vdit_core.step_cache import StepCache


def _pipelines(tmp_path_factory):
    import test_hunyuandit
    import test_opensora

    hy_root = tmp_path_factory.mktemp("hy")
    _, hy_folder = test_hunyuandit.reference(hy_root, "v1.2", "ddim")
    os_folder = test_opensora.folder.__wrapped__(tmp_path_factory)
    return {
        "cogvideox": (load_pipeline(demo_model_path(), device="cpu"), dict(prompt="a red circle moving right")),
        "hunyuandit": (load_pipeline(hy_folder, device="cpu"), dict(prompt="a red circle", num_frames=1, height=64, width=64, cfg=6.0)),
        "opensora": (load_pipeline(os_folder, device="cpu"), dict(prompt="a red circle moving right", num_frames=17, height=24, width=32)),
    }


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return _pipelines(tmp_path_factory)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuandit", "opensora"])
def test_step_cache_skips_steps_whose_input_barely_changed(pipelines, family):
    pipe, kw = pipelines[family]
    kw = {**kw, "steps": 8, "seed": 0, "progress": False}
    plain = pipe(**kw)
    assert pipe.last_step_cache is None and pipe.transformer.step_cache is None
    # below any change: every step runs, the result is the uncached one exactly
    assert torch.equal(pipe(**kw, step_cache=1e-12), plain)
    assert (pipe.last_step_cache.computed, pipe.last_step_cache.skipped) == (8, 0)
    # above any change: only the first step runs
    everything = pipe(**kw, step_cache=1e9)
    assert (pipe.last_step_cache.computed, pipe.last_step_cache.skipped) == (1, 7) and torch.isfinite(everything).all()
    assert pipe.transformer.step_cache is None  # the model forgets the run's cache
    if family == "cogvideox":  # the demo's trained model, at its 30 steps: a mild threshold skips some and stays close
        kw["steps"] = 30
        plain, mild = pipe(**kw), pipe(**kw, step_cache=0.1)
        assert 0 < pipe.last_step_cache.skipped < 29
        everything = pipe(**kw, step_cache=1e9)
        assert ((mild - plain) ** 2).mean() < ((everything - plain) ** 2).mean() / 10


def test_branches_called_separately_keep_their_own_state():
    """Conditional and unconditional calls made one after the other (CFG unbatched) are compared
    with their own previous steps, not with each other."""
    cache = StepCache(threshold=0.5)
    blocks = lambda x: x * 2  # noqa: E731
    a, b = torch.ones(1, 3), torch.full((1, 3), 10.0)
    assert torch.equal(cache.run("cond", a, a, blocks), a * 2) and torch.equal(cache.run("uncond", b, b, blocks), b * 2)
    # each branch's signal changed by 10% since its own last step: both skip, each with its own residual
    assert torch.equal(cache.run("cond", a, a * 1.1, blocks), a + a) and torch.equal(cache.run("uncond", b, b * 1.1, blocks), b + b)
    assert (cache.computed, cache.skipped) == (2, 2)
    # the changes add up: another 50% (0.1 + 0.5 >= 0.5) runs the blocks again
    assert torch.equal(cache.run("cond", a, a * 1.1 * 1.5, blocks), a * 2) and cache.computed == 3


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_thresholds_are_refused(pipelines, bad):
    pipe, kw = pipelines["cogvideox"]
    with pytest.raises(ValueError, match="step_cache=.*must be a number >= 0"):
        pipe(**kw, steps=2, step_cache=bad)


def test_compiled_blocks_equal_eager():
    """Regional torch.compile (each block compiled; the blocks share the compiled code) gives the
    eager output within 1e-5, where a compiler is available; without one, compile is refused
    before loading."""
    from vdit_core.pipeline import check_compiler

    try:
        check_compiler("cpu")
    except ValueError as e:
        pytest.skip(str(e))
    eager = load_pipeline(demo_model_path(), device="cpu")
    compiled = load_pipeline(demo_model_path(), device="cpu", compile=True)
    x, t, ctx = torch.randn(2, 2, 5, 8, 8), torch.tensor([500.0, 300.0]), torch.randn(2, 16, 64)
    with torch.no_grad():
        assert (compiled.transformer(x, t, ctx) - eager.transformer(x, t, ctx)).abs().max() < 1e-5
    kw = dict(prompt="a red circle moving right", steps=4, seed=0, progress=False)
    assert (compiled(**kw) - eager(**kw)).abs().max() < 1e-4  # frames in [0, 1] after 4 steps with CFG


def test_compile_without_a_compiler_is_refused(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="compile: torch.compile on a CPU needs a C\\+\\+ compiler"):
        load_pipeline(demo_model_path(), device="cpu", compile=True)


@pytest.mark.parametrize("family", ["cogvideox", "hunyuandit", "opensora"])
def test_the_residual_stream_is_token_major_in_every_block(pipelines, family):
    """Patch embeddings come out of a convolution channel-major; kept as a transposed view, the
    residual sum would keep that layout and every LayerNorm would copy it (a few % of the forward)."""
    pipe, kw = pipelines[family]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous())) for b in pipe.family.blocks(pipe.transformer)]
    try:
        pipe(**{**kw, "steps": 1, "seed": 0, "progress": False})
    finally:
        for h in hooks:
            h.remove()
    assert seen and all(seen)
