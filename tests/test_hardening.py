"""Bad input and faults, as a new user and a security reviewer would try them: every case is
refused with one line naming the value or file (before any work and before any file is touched),
or handled without losing a file; never a traceback, a silent NaN or a server crash."""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import tiny  # noqa: E402
from test_package import load_pack  # noqa: E402
from test_train import args, losses, make_data, model_dir  # noqa: E402, F401  (model_dir is a fixture)
from vdit_core.checkpoint import CheckpointError  # noqa: E402
from vdit_core.generate import main as generate  # noqa: E402
from vdit_core.lora import load_lora  # noqa: E402
from vdit_core.pipeline import load_pipeline  # noqa: E402
from vdit_core.sampling import SEED_MAX, SeededNoise  # noqa: E402
from vdit_core.train import trainer  # noqa: E402
from vdit_core.train.trainer import main as train  # noqa: E402
from vdit_core.video_io import read_video, write_video  # noqa: E402

PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
comfy = __import__(f"{PACK.__name__}.nodes.comfy", fromlist=["x"])
node_sampling = __import__(f"{PACK.__name__}.nodes.sampling", fromlist=["x"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    return {v: tiny.reference_pipeline(root, v, "ddim")[1] for v in ("5b", "5b-i2v")}


@pytest.fixture(scope="module")
def pipe(folders):
    return load_pipeline(folders["5b"], device="cpu")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


# ----------------------------------------------------------------------------------------------
# security and the server


@pytest.mark.parametrize("prefix", ["../../x", "../escape", "/tmp/vdit_escape/x", "vdit/../../x", "vdit/.."])
def test_save_video_refuses_prefixes_that_leave_the_output_folder(tmp_path, prefix):
    comfy.set_paths(output=tmp_path / "output")
    (tmp_path / "output").mkdir()
    before = _files(tmp_path)
    assert "inside ComfyUI's output folder only" in NODES["VDITSaveVideo"].VALIDATE_INPUTS(prefix)  # refused before the graph runs
    with pytest.raises(ValueError, match="inside ComfyUI's output folder only"):
        NODES["VDITSaveVideo"]().save(torch.rand(5, 32, 48, 3), 8.0, prefix, "mp4")
    assert _files(tmp_path) == before and not Path("/tmp/vdit_escape").exists()
    assert NODES["VDITSaveVideo"].VALIDATE_INPUTS("vdit/sub/clip") is True
    ui = NODES["VDITSaveVideo"]().save(torch.rand(5, 32, 48, 3), 8.0, "vdit/sub/clip", "mp4")["ui"]["images"][0]
    assert ui["subfolder"] == "vdit/sub" and (tmp_path / "output" / "vdit" / "sub" / ui["filename"]).exists()


@pytest.mark.parametrize("channels", [1, 2, 3, 16])
def test_previews_are_rgb_for_any_latent_channel_count(channels, tmp_path):
    img = node_sampling._preview(torch.randn(1, channels, 3, 4, 6), 8)
    assert img.mode == "RGB" and img.size == (48, 32)
    img.save(tmp_path / "preview.jpg", format="JPEG")  # what ComfyUI does with it (a 2-channel image aborted the server)


def test_seed_range_is_comfyuis_and_wraps_instead_of_overflowing():
    assert NODES["VDITSampler"].INPUT_TYPES()["required"]["seed"][1]["max"] == SEED_MAX == 2**64 - 1
    noise = SeededNoise(SEED_MAX, (2, 3))()  # sample 1 draws from seed + 1, which wraps to 0
    assert torch.equal(noise[1], SeededNoise(0, (1, 3))()[0])


# ----------------------------------------------------------------------------------------------
# silent NaN and nonsense values


def _lora(model, path: Path, value=None, alpha=None, rank=4) -> Path:
    name = next(n for n, m in model.named_modules() if n.endswith("attn1.to_v"))
    lin = dict(model.named_modules())[name]
    a, b = torch.randn(rank, lin.in_features), torch.randn(lin.out_features, rank)
    if value is not None:
        b[0, 0] = value
    tensors = {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b}
    if alpha is not None:
        tensors[f"diffusion_model.{name}.alpha"] = alpha
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case,pattern", [
    ("nan", "NaN or infinite weights"), ("inf", "NaN or infinite weights"), ("alpha_nan", "alpha must be one finite number"),
    ("alpha_vector", r"alpha must be one finite number, got a tensor of shape \(4,\)"), ("rank0", "rank 0"),
])
def test_damaged_lora_files_are_refused_naming_the_file(pipe, tmp_path, case, pattern):
    model = pipe.transformer
    path = tmp_path / f"{case}.safetensors"
    {
        "nan": lambda: _lora(model, path, value=math.nan),
        "inf": lambda: _lora(model, path, value=math.inf),
        "alpha_nan": lambda: _lora(model, path, alpha=torch.tensor(math.nan)),
        "alpha_vector": lambda: _lora(model, path, alpha=torch.ones(4)),
        "rank0": lambda: _lora(model, path, rank=0),
    }[case]()
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{pattern}"):
        load_lora(model, path)
    assert not model.__dict__.get("_vdit_loras")
    with pytest.raises(ValueError, match="strength nan is not a finite number"):
        load_lora(model, _lora(model, tmp_path / "ok.safetensors"), strength=math.nan)


@pytest.mark.parametrize("cfg", [math.inf, -math.inf, math.nan, -1.0])
def test_guidance_that_is_not_a_finite_number_is_refused(pipe, cfg):
    with pytest.raises(ValueError, match=r"cfg=.*: the guidance scale must be a finite number >= 0"):
        pipe(prompt="x", num_frames=9, height=32, width=48, steps=2, cfg=cfg, progress=False)


@pytest.mark.parametrize("name", ["num_frames", "height", "width", "steps"])
def test_zero_is_refused_not_replaced_by_the_default(pipe, name, capsys, folders, tmp_path):
    with pytest.raises(ValueError, match=f"{name}=0: must be a whole number of at least 1"):
        pipe(prompt="x", **{name: 0}, progress=False)
    flag = {"num_frames": "--frames"}.get(name, f"--{name}")
    assert generate(["--model", str(folders["5b"]), "--prompt", "x", flag, "0", "--out", str(tmp_path / "x.mp4")]) == 2
    assert f"{name}=0" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()


def test_nan_inputs_are_refused(pipe, folders):
    with pytest.raises(ValueError, match="the input video contains NaN"):
        pipe(prompt="x", video=torch.full((9, 32, 48, 3), math.nan), denoise=0.5, steps=2, progress=False)
    with pytest.raises(ValueError, match="noise contains NaN"):
        pipe(prompt="x", num_frames=9, height=32, width=48, steps=2, noise=torch.full((1, 4, 3, 4, 6), math.nan), progress=False)
    i2v = load_pipeline(folders["5b-i2v"], device="cpu")
    image = torch.rand(1, 32, 48, 3)
    image[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="the input image contains NaN"):
        i2v(prompt="x", image=image, steps=2, progress=False)
    vae = NODES["VDITVAELoader"]().load("vdit-demo (bundled)", "default", "auto")[0]
    with pytest.raises(ValueError, match="the latent contains NaN"):
        NODES["VDITVAEDecode"]().decode(vae, {"samples": torch.full((1, 2, 5, 8, 8), math.nan)}, 2, "auto", 0, 0)


def test_requests_that_cannot_fit_are_refused_before_any_allocation(pipe):
    with pytest.raises(ValueError, match=r"100000x100000 need about .* free; what fits: \d+x\d+ at 9 frames"):
        pipe(prompt="x", num_frames=9, height=100000, width=100000, steps=1, progress=False)
    with pytest.warns(UserWarning, match="num_frames=10001 is 1111x the 9 frames"):  # runs, but the user is told
        pipe.check_size(10001, 32, 48)


def test_a_folder_without_config_json_warns_loudly(folders, tmp_path):
    from vdit_core.models.cogvideox import load_transformer

    bare = tmp_path / "transformer"
    shutil.copytree(folders["5b"] / "transformer", bare)
    (bare / "config.json").unlink()
    with pytest.warns(UserWarning, match="no config.json; the architecture was read off the weights"):
        load_transformer(bare)


# ----------------------------------------------------------------------------------------------
# files are never lost or half-written


def test_a_failing_encoder_leaves_the_earlier_video_and_no_partial_file(tmp_path, monkeypatch):
    import vdit_core.video_io as vio

    path = write_video(tmp_path / "clip.mp4", torch.rand(5, 32, 48, 3))
    before = path.read_bytes()

    def full_disk(tmp, data, fps, quality, suffix):
        tmp.write_bytes(b"\x00" * 100)  # what a dying encoder leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vio, "_encode", full_disk)
    with pytest.raises(ValueError, match=r"clip.mp4: writing the video failed \(OSError: .*No space left"):
        write_video(path, torch.rand(5, 32, 48, 3))
    assert path.read_bytes() == before and _files(tmp_path) == {"clip.mp4"}
    monkeypatch.setattr(vio, "_encode", lambda tmp, *a: tmp.write_bytes(b"garbage"))  # an encoder that "succeeds"
    with pytest.raises(ValueError, match="clip.mp4: .*cannot be decoded"):
        write_video(path, torch.rand(5, 32, 48, 3))
    assert path.read_bytes() == before and _files(tmp_path) == {"clip.mp4"}


def test_cli_checks_its_output_before_loading_the_model(tmp_path, capsys, folders, monkeypatch):
    missing_model = str(tmp_path / "no-such-model")  # an output problem is reported first: nothing was loaded
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / "x.avi2", "unknown video format"), (tmp_path / "afile" / "x.mp4", "is a file, not a folder"),
             (tmp_path, "is a folder")]
    for out, message in cases:
        assert generate(["--model", missing_model, "--prompt", "x", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    import vdit_core.video_io as vio

    with monkeypatch.context() as mp:  # (root may write anywhere, so a read-only folder is simulated)
        mp.setattr(vio.os, "access", lambda p, mode: False)
        assert generate(["--model", missing_model, "--prompt", "x", "--out", str(tmp_path / "ro" / "x.mp4")]) == 2
        assert f"the folder {tmp_path} is not writable" in capsys.readouterr().err
    existing = write_video(tmp_path / "old.mp4", torch.rand(5, 32, 48, 3))
    before = existing.read_bytes()
    assert generate(["--model", missing_model, "--prompt", "x", "--out", str(existing)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and existing.read_bytes() == before
    args_ = ["--model", str(folders["5b"]), "--prompt", "x", "--frames", "9", "--height", "32", "--width", "48", "--steps", "1"]
    assert generate([*args_, "--out", str(existing), "--overwrite"]) == 0
    assert existing.read_bytes() != before and read_video(existing)[0].shape == (9, 32, 48, 3)


def test_cli_device_and_attention_errors_are_one_line(folders, tmp_path, capsys):
    common = ["--model", str(folders["5b"]), "--prompt", "x", "--out", str(tmp_path / "x.mp4")]
    if not torch.cuda.is_available():
        assert generate([*common, "--device", "cuda"]) == 2
        assert "device 'cuda': this PyTorch build has no CUDA" in capsys.readouterr().err
    assert generate([*common, "--attention", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown attention backend 'bogus'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# training


def test_a_new_run_never_writes_over_an_earlier_one(model_dir, tmp_path, capsys):  # noqa: F811
    data = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert train(args(model_dir, data, out, "--steps", 2, "--lora-rank", 4)) == 0
    lora = (out / "lora.safetensors").read_bytes()
    capsys.readouterr()
    assert train(args(model_dir, data, out, "--steps", 2, "--lora-rank", 8)) == 2
    assert "holds an earlier run" in capsys.readouterr().err and (out / "lora.safetensors").read_bytes() == lora
    assert len(losses(out)) == 2
    # a resume with another rank: a clear message, not a shape traceback
    assert train(args(model_dir, data, out, "--steps", 4, "--lora-rank", 8, "--resume")) == 2
    assert "was the LoRA rank changed" in capsys.readouterr().err
    # --overwrite replaces the earlier run (its cache is kept)
    assert train(args(model_dir, data, out, "--steps", 2, "--lora-rank", 8, "--overwrite")) == 0
    weights = load_file(str(out / "lora.safetensors"))
    assert len(losses(out)) == 2 and all(v.shape[0] == 8 for k, v in weights.items() if k.endswith("lora_A.weight"))


def test_resume_takes_the_new_learning_rate_and_says_so(model_dir, tmp_path, capsys):  # noqa: F811
    data = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert train(args(model_dir, data, out, "--steps", 2, "--lora-rank", 4, "--lr", "1e-3", "--checkpoint-every", 2)) == 0
    capsys.readouterr()
    assert train(args(model_dir, data, out, "--steps", 4, "--lora-rank", 4, "--lr", "5e-4", "--resume")) == 0
    log = capsys.readouterr().out
    assert "from the checkpoint; everything else from this command: changed" in log and "lr 0.0005 (was 0.001)" in log
    assert [r["lr"] for r in losses(out)] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert "lr = 0.0005" in (out / "config.toml").read_text()


def test_non_finite_weights_are_never_checkpointed_and_the_good_checkpoint_survives(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    data = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    common = ["--lora-rank", 4, "--checkpoint-every", 1, "--keep-checkpoints", 1]
    assert train(args(model_dir, data, out, "--steps", 2, *common)) == 0
    good = out / "checkpoints" / "step-0000002"
    assert good.exists()
    capsys.readouterr()
    # an update that blows the weights up (as a far too high learning rate does): no checkpoint of
    # them, and the good one is not rotated away
    real = trainer._update

    def exploding(cfg, optimizer, scheduler, scaler, params, ema):
        real(cfg, optimizer, scheduler, scaler, params, ema)
        with torch.no_grad():
            params[0].fill_(math.inf)

    monkeypatch.setattr(trainer, "_update", exploding)
    assert train(args(model_dir, data, out, "--steps", 5, *common, "--resume")) == 2
    captured = capsys.readouterr()
    assert "not saving a checkpoint" in captured.out and f"the last good checkpoint is {good}" in captured.out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert "not finite" in captured.err


def test_checkpoint_write_errors_are_one_line_and_keep_the_previous_checkpoint(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    data = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if "step-0000004.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train(args(model_dir, data, out, "--steps", 4, "--lora-rank", 4, "--checkpoint-every", 2)) == 2
    err = capsys.readouterr().err
    assert "step 4: writing the checkpoint" in err and "No space left" in err and "step-0000002 is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]


def test_full_saves_switch_in_whole(tmp_path, monkeypatch, pipe):
    from vdit_core.models import cogvideox

    folder = tmp_path / "transformer"
    cogvideox.save_transformer(pipe.transformer, folder, max_shard_bytes=20_000)
    assert len(list(folder.glob("*.safetensors"))) > 1
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import safetensors.torch

    calls = []

    def failing(tensors, path, *a, **kw):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        cogvideox.save_transformer(pipe.transformer, folder)
    assert calls and {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier set is untouched
    monkeypatch.undo()
    cogvideox.save_transformer(pipe.transformer, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]  # no .partial / .old left


def test_training_cli_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    data = make_data(tmp_path / "data", 2)
    (data / "latin1.mp4").write_bytes((data / "clip0.mp4").read_bytes())
    (data / "latin1.txt").write_bytes("un carr\xe9 rouge".encode("latin-1"))
    assert train(args(model_dir, data, tmp_path / "out", "--steps", 1, "--lora-rank", 4)) == 0
    assert "latin1.mp4: caption file latin1.txt is not UTF-8 text" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(args(model_dir, empty, tmp_path / "out2", "--steps", 1)) == 2
    assert "no usable clips: it holds no videos or images with captions" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train(args(model_dir, data, tmp_path / "out3", "--device", "cuda")) == 2
        assert "has no CUDA" in capsys.readouterr().err
    # Ctrl-C: where the last checkpoint is and how to go on
    real = trainer._save_checkpoint

    def stop_after(out, step, *a, **kw):
        real(out, step, *a, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_checkpoint", stop_after)
    with pytest.raises(KeyboardInterrupt):
        train(args(model_dir, data, tmp_path / "out4", "--steps", 4, "--lora-rank", 4, "--checkpoint-every", 2))
    err = capsys.readouterr().err
    assert "interrupted; the newest checkpoint is" in err and "step-0000002" in err and "--resume" in err


# ----------------------------------------------------------------------------------------------
# small ones


def test_small_messages(pipe, folders, tmp_path):
    with pytest.raises(ValueError, match=r"height=-16: must be a positive multiple of 16; nearest valid: 16 or 32"):
        pipe.check_size(9, -16, 48)
    from vdit_core.vae.cogvideox_vae import load_vae

    partial = tmp_path / "partial_vae"
    shutil.copytree(folders["5b"] / "vae", partial)
    weights = partial / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    save_file({k: v for k, v in sd.items() if not k.startswith("encoder.")}, str(weights))
    with pytest.raises(CheckpointError, match=r"partial_vae: expected a CogVideoX VAE, but this looks like an incomplete or other-sized CogVideoX VAE .*missing"):
        load_vae(partial)
    (partial / "config.json").unlink()  # without a config the architecture is read off the weights: the file is named
    with pytest.raises(CheckpointError, match=r"partial_vae: an incomplete CogVideoX VAE: it has no encoder.down_blocks"):
        load_vae(partial)
    from vdit_core.models.cogvideox import load_transformer

    sd = load_file(str(folders["5b"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    part = tmp_path / "part.safetensors"
    save_file({k: v for k, v in sd.items() if k != "proj_out.weight"}, str(part))
    with pytest.raises(CheckpointError, match=r"part.safetensors: .*proj_out"):
        load_transformer(part)


def test_a_set_of_shards_loads_from_its_first_file_and_a_missing_one_is_named(tmp_path):
    """Shards saved without their index (as a download dialog fetches them) load as one file from
    any of them; one absent is refused, naming it; the lists offer the first of a set only."""
    from vdit_core.checkpoint import load_state_dict

    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3)}
    save_file(a, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "m-00002-of-00002.safetensors"))
    for name in ("m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"):
        assert sorted(load_state_dict(tmp_path / name)) == ["x", "y"]
    assert sorted(load_state_dict(tmp_path)) == ["x", "y"]  # a folder of them, no index
    comfy = __import__(f"{load_pack().__name__}.nodes.comfy", fromlist=["x"])
    if not comfy.IN_COMFY:
        old = comfy._paths["models"]
        comfy.set_paths(models=tmp_path.parent)
        try:
            assert comfy.list_files(tmp_path.name) == ["m-00001-of-00002.safetensors"]
        finally:
            comfy._paths["models"] = old
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m-00001-of-00002.safetensors: shard 1 of 2; the others must be beside it, "
                                              r"but m-00002-of-00002.safetensors is missing$"):
        load_state_dict(tmp_path / "m-00001-of-00002.safetensors")
