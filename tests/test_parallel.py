"""Several processes for one video (vdit_core.parallel): on CPU, 2 ranks over gloo give the
single-process result within 1e-5, for every family's transformer (sequence parallel, token
counts that split evenly and ones that need padding) and for whole sampling runs (CFG branches
on two ranks, and the sequence split alone); ``torchrun -m vdit_core.generate`` writes once."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tiny
from report import REPORT
from vdit_core.demo import demo_model_path
from vdit_core.models.cogvideox import CogVideoXConfig, CogVideoXTransformer
from vdit_core.models.hunyuan_dit import HunyuanDiT, HunyuanDiTConfig
from vdit_core.models import opensora
import vdit_core.pipeline as pipeline_mod
from vdit_core.guidance import CFGDenoiser
from vdit_core.pipeline import load_pipeline

FIXTURE = Path(__file__).parent / "fixtures" / "opensora"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs_file: str, out_file: str) -> None:
    """One rank: join the gloo group, run every job split over the ranks, rank 0 saves the results."""
    import torch.distributed as dist

    from vdit_core import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, job in torch.load(jobs_file, weights_only=False).items():
            if job["kind"] == "forward":
                model = job["model"]
                model.set_sequence_parallel(parallel.plan(guidance=False).sequence)
                with torch.no_grad():
                    results[name] = model(*job["args"], **job["kwargs"])
            else:  # a whole sampling run on a pipeline folder
                pipe = load_pipeline(job["folder"], device="cpu")
                split = parallel.plan(guidance=True, split_cfg=job["split_cfg"])
                parallel.enable(pipe, split)
                results[name] = pipe(**job["kwargs"], decode=False, progress=False)
                results[name + ":describe"] = split.describe()
                if pipe.last_step_cache is not None:
                    results[name + ":skipped"] = pipe.last_step_cache.skipped
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _run_split(tmp_path: Path, jobs: dict) -> dict:
    jobs_file, out_file = tmp_path / "jobs.pt", tmp_path / "out.pt"
    torch.save(jobs, jobs_file)
    mp.start_processes(_worker, args=(2, _free_port(), str(jobs_file), str(out_file)), nprocs=2, start_method="spawn")
    return torch.load(out_file, weights_only=False)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter non-zero (zero-initialised gates would hide the blocks)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _forward_jobs() -> dict:
    torch.manual_seed(1)
    jobs = {}
    text = torch.randn(2, 7, tiny.TEXT_DIM)
    for variant, frames in (("2b", 3), ("5b", 3), ("5b-i2v", 2), ("1.5-i2v", 2)):
        cfg = CogVideoXConfig.from_diffusers(tiny.transformer_kwargs(variant))
        model = _randomised(CogVideoXTransformer(cfg))
        h, w = (4, 6) if variant != "1.5-i2v" else (6, 10)  # 3x2x3 tokens split evenly; 1x3x5 needs a padding token
        x = torch.randn(2, cfg.in_channels, frames, h, w)
        jobs[f"cogvideox-{variant}"] = dict(kind="forward", model=model, args=(x, torch.tensor([500.0, 20.0]), text), kwargs={})
    hy_cfg = HunyuanDiTConfig(num_attention_heads=2, attention_head_dim=8, hidden_size=16, num_layers=4, mlp_ratio=2.5,
                              cross_attention_dim=12, cross_attention_dim_t5=tiny.TEXT_DIM, pooled_projection_dim=8, text_len=5,
                              text_len_t5=6, sample_size=8)
    hy = _randomised(HunyuanDiT(hy_cfg))
    clip, t5 = torch.randn(2, 5, 12), torch.randn(2, 6, tiny.TEXT_DIM)
    masks = (torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]))
    for h, w in ((6, 8), (6, 10)):  # 12 tokens; 15 tokens (padded)
        jobs[f"hunyuandit-{h}x{w}"] = dict(kind="forward", model=hy, args=(torch.randn(2, 4, 1, h, w), torch.tensor([900.0, 3.0]),
                                                                            clip, masks[0], t5, masks[1]), kwargs={})
    stdit = opensora.load_transformer(FIXTURE / "transformer")
    y, ymask = torch.randn(2, 9, 16), torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    for h, w in ((8, 12), (6, 10)):  # 24 tokens a frame; 15 (padded)
        x = torch.randn(2, 4, 3, h, w)
        jobs[f"opensora-{h}x{w}"] = dict(kind="forward", model=stdit, args=(x, torch.tensor([700.0, 100.0]), y),
                                         kwargs=dict(mask=ymask, x_mask=x_mask, fps=torch.tensor([24.0, 24.0])))
    return jobs


def test_two_ranks_give_the_single_process_output(tmp_path, tmp_path_factory, monkeypatch):
    """Each family's transformer with its tokens split over 2 gloo ranks; then whole sampling runs
    of each family with the CFG branches on the two ranks, and with only the sequence split (the
    demo also with step caching: the ranks must agree on which steps to skip)."""
    import test_hunyuandit
    import test_opensora

    jobs = _forward_jobs()
    run = dict(prompt="a red circle moving right", negative_prompt="a blue square", steps=6, seed=3)
    _, hy_folder = test_hunyuandit.reference(tmp_path_factory.mktemp("hy"), "v1.2", "ddim")
    os_folder = test_opensora.folder.__wrapped__(tmp_path_factory)
    runs = {
        "demo": (demo_model_path(), run),
        "hunyuandit": (hy_folder, dict(run, num_frames=1, height=48, width=80, cfg=6.0)),  # 24x40 latents: 240 tokens
        "opensora": (os_folder, dict(run, num_frames=17, height=24, width=40)),  # 3x5 tokens a frame: padded to 2x8
    }
    for name, (folder, kw) in runs.items():
        for split_cfg in (True, False):
            jobs[f"{name}-{'cfg-split' if split_cfg else 'sequence'}"] = dict(kind="pipeline", folder=str(folder), split_cfg=split_cfg, kwargs=kw)
    jobs["demo-sequence-step-cache"] = dict(kind="pipeline", folder=str(demo_model_path()), split_cfg=False,
                                            kwargs=dict(run, steps=30, step_cache=0.1))
    split = _run_split(tmp_path, jobs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the matrix products' blocking (and rounding) depends on the thread count
    try:
        _compare(jobs, split, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert split["demo-cfg-split:describe"] == "2 ranks: CFG branches on 2 rank groups"
    assert split["demo-sequence:describe"] == "2 ranks: sequence parallel over 2 ranks"


def _compare(jobs: dict, split: dict, monkeypatch) -> None:
    for name, job in jobs.items():
        if job["kind"] == "forward":
            with torch.no_grad():
                expected = job["model"](*job["args"], **job["kwargs"])
        else:
            pipe = load_pipeline(job["folder"], device="cpu")
            expected = pipe(**job["kwargs"], decode=False, progress=False)
            if pipe.last_step_cache is not None:  # the same steps skipped as one process
                assert 0 < split[name + ":skipped"] == pipe.last_step_cache.skipped, name
            if job["split_cfg"]:
                # one branch per rank is one process's CFG in two passes (its out-of-memory fallback)
                # exactly; the default one batched pass rounds its matrix products differently
                monkeypatch.setattr(pipeline_mod, "CFGDenoiser", functools.partial(CFGDenoiser, batched=False))
                two_passes = pipe(**job["kwargs"], decode=False, progress=False)
                monkeypatch.undo()
                assert float((split[name] - two_passes).abs().max()) < 1e-6, name
        got = split[name]
        assert got.shape == expected.shape, name
        err = float((got - expected).abs().max())
        REPORT[f"2 ranks vs 1: {name}"] = err
        # against the batched pass, CFG (scale 6-7) amplifies the products' rounding: 1e-5 of the latents' scale
        scale = max(1.0, float(expected.abs().max())) if job.get("split_cfg") else 1.0
        assert err < 1e-5 * scale, f"{name}: {err:.2e}"
        assert expected.abs().max() > 0.1, name  # a real output, not an empty one


def _out_of_memory_worker(rank: int, world: int, port: int, out_file: str) -> None:
    """One rank of a sequence split with batched CFG, where only rank 1 runs out of memory in the
    batched pass; rank 0 saves what each rank called and returned."""
    import torch.distributed as dist

    from vdit_core import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        split = parallel.plan(guidance=True, split_cfg=False)
        passes = []

        def model(x, sigma, c):
            passes.append(x.shape[0])
            if rank == 1 and x.shape[0] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return x * c

        denoiser = split.guidance(model, 3.0)
        x, sigma = torch.ones(1, 4), torch.ones(1)
        outs = [denoiser(x, sigma, cond={"c": torch.full((1, 1), 2.0)}, uncond={"c": torch.full((1, 1), 1.0)}) for _ in range(2)]
        ranks = [None] * world
        dist.all_gather_object(ranks, dict(passes=passes, batched=denoiser.batched, outs=outs))
        if rank == 0:
            torch.save(ranks, out_file)
    finally:
        dist.destroy_process_group()


def test_out_of_memory_fallback_is_decided_by_every_rank_together(tmp_path):
    """Under sequence parallel every forward exchanges data between the ranks, so the ranks must
    make the same calls: when one rank runs out of memory in the batched CFG pass, every rank
    falls back to two passes (a rank that alone kept batching would wait forever in an exchange
    its partner never joins)."""
    out_file = tmp_path / "out.pt"
    mp.start_processes(_out_of_memory_worker, args=(2, _free_port(), str(out_file)), nprocs=2, start_method="spawn")
    ranks = torch.load(out_file, weights_only=False)
    for r in ranks:
        assert r["passes"] == [2, 1, 1, 1, 1] and r["batched"] is False, ranks  # tried batched once, then two passes
        assert all(torch.equal(o, torch.full((1, 4), 1.0 + 3.0 * (2.0 - 1.0))) for o in r["outs"])


def test_heads_that_do_not_split_are_refused():
    from vdit_core.parallel import SequenceParallel

    sp = SequenceParallel.__new__(SequenceParallel)
    sp.size = 4
    with pytest.raises(ValueError, match=r"30 attention heads, which do not divide by 4; use 1, 2, 3, 5, 6, 10, 15 sequence ranks"):
        sp.check_heads(30, "CogVideoX-2B")


def test_torchrun_generate_writes_once(tmp_path):
    """The CLI under torchrun: rank 0 alone says how the work is split and writes the video."""
    out = tmp_path / "split.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "vdit_core.generate", "--prompt", "a red circle moving right", "--steps", "4", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("parallel: 2 ranks: CFG branches on 2 rank groups") == 1, done.stdout
    assert done.stdout.count("wrote ") == 1 and out.is_file()
    # a refusal is said once, by rank 0, before anything loads
    bad = subprocess.run(cmd[:-2] + ["--frames", "0", "--out", str(tmp_path / "x.mp4")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=280)
    assert bad.returncode != 0 and bad.stderr.count("error: num_frames=0") == 1, bad.stderr[-2000:]
