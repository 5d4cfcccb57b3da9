"""The model-family layer is real: a made-up fourth family, defined in this file (a tiny DiT with
masked cross-attention to text, flow matching, its own frame rate and defaults), runs through
``load_pipeline``, the ComfyUI node graph and the trainer with no change to ``nodes/``,
``vdit_core/train/`` or the pipeline. It borrows the CogVideoX VAE and T5 classes, as a real
family may."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

pytest.importorskip("diffusers")

import tiny  # noqa: E402
from test_package import ROOT, load_pack  # noqa: E402
from vdit_core import families  # noqa: E402
from vdit_core.checkpoint import CheckpointError, load_model  # noqa: E402
from vdit_core.layers import timestep_embedding  # noqa: E402
from vdit_core.pipeline import load_pipeline  # noqa: E402
from vdit_core.prediction import FlowPrediction  # noqa: E402
from vdit_core.schedules import FlowSchedule  # noqa: E402
from vdit_core.text import load_t5  # noqa: E402
from vdit_core.vae.cogvideox_vae import load_vae  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the toy family


@dataclass(frozen=True)
class ToyConfig:
    channels: int = 4  # latent channels (the tiny CogVideoX VAE's)
    dim: int = 32
    text_dim: int = tiny.TEXT_DIM
    depth: int = 2
    patch: int = 2


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, text, mask):
        # x [B, N, D], text [B, L, D], mask [B, L]: cross-attention to the unmasked text tokens
        k, v = self.kv(text).chunk(2, dim=-1)
        scores = self.q(self.norm(x)) @ k.transpose(1, 2) / math.sqrt(x.shape[-1])  # [B, N, L]
        x = x + self.out(scores.masked_fill(~mask[:, None, :].bool(), -math.inf).softmax(-1) @ v)
        return x + self.mlp(F.gelu(x))


class ToyDiT(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        c, d, p = config.channels, config.dim, config.patch
        self.toy_in = nn.Linear(c * p * p, d)
        self.time = nn.Linear(d, d)
        self.text = nn.Linear(config.text_dim, d)
        self.blocks = nn.ModuleList([ToyBlock(d) for _ in range(config.depth)])
        self.toy_out = nn.Linear(d, c * p * p)

    def set_attention_backend(self, backend):
        pass

    def forward(self, x, t, context, context_mask):
        b, c, f, h, w = x.shape
        p, d = self.config.patch, self.config.dim
        tokens = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * p * p)
        hid = self.toy_in(tokens) + self.time(timestep_embedding(t.reshape(-1).expand(b), d))[:, None]
        text = self.text(context.float())
        for block in self.blocks:
            hid = block(hid, text, context_mask)
        out = self.toy_out(hid).reshape(b, f, h // p, w // p, c, p, p)
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


class Toy(families.Family):
    name = "toy"
    label = "Toy"
    signatures = (families.Signature("a Toy transformer", lambda k: "toy_in.weight" in k, "toy", "transformer"),)
    pipeline_classes = ("ToyPipeline",)
    lora_targets = r"blocks\.\d+\.(q|kv|out)"

    def owns(self, transformer):
        return isinstance(transformer, ToyDiT)

    def load_transformer(self, path, dtype, device):
        return load_model(path, build=ToyDiT, expected="a Toy transformer", recognise=lambda k: "toy_in.weight" in k,
                          from_json=lambda d: ToyConfig(**d), infer_config=lambda sd: ToyConfig(), dtype=dtype, device=device)

    def load_vae(self, path, dtype, device, variant=None):
        return load_vae(path, dtype=dtype, device=device)

    def load_text_encoder(self, path, dtype, device, tokenizer=None, max_length=0):
        path = Path(path)
        return load_t5(path / "text_encoder", path / "tokenizer", dtype=dtype or torch.float32, device=device, max_length=max_length or 48)

    def save_transformer(self, transformer, folder, dtype, state_dict=None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(transformer.config)))
        sd = state_dict if state_dict is not None else transformer.state_dict()
        save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))

    def sampling_defaults(self, folder, config):
        return {"schedule": FlowSchedule(shift=2.0), "sampler": "euler", "steps": 4, "cfg": 3.0, "vae_scale": 8}

    def denoiser(self, net, schedule):
        return FlowPrediction(net, schedule)

    def encode_text(self, text_encoder, prompt):
        ids = text_encoder.tokenize(prompt)
        mask = (ids != text_encoder.tokenizer.pad_token_id).long()
        return {"context": text_encoder.encode(prompt), "context_mask": mask.to(text_encoder.device)}

    def fps(self, config):
        return 12

    def latent_channels(self, config):
        return config.channels

    def default_size(self, config, spatial_scale):
        return 9, 32, 48

    def latent_frames(self, config, num_frames):
        t = (num_frames - 1) // 4 + 1
        return t, t

    def size_problem(self, num_frames, height, width, config=None, spatial_scale=8, frames_label="num_frames"):
        if num_frames < 1 or (num_frames - 1) % 4:
            return f"{frames_label}={num_frames}: Toy takes 4k+1 frames"
        return families.multiple_problem("height", height, 16) or families.multiple_problem("width", width, 16)

    def vae_info(self, vae_config):
        return {"scaling_factor": vae_config.get("scaling_factor", 1.0)}

    def blocks(self, transformer):
        return transformer.blocks


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    """A Toy model folder (borrowing the tiny CogVideoX VAE, T5 and tokenizer), with the Toy
    family registered for the module's tests only."""
    root = tmp_path_factory.mktemp("toy")
    _, cog = tiny.reference_pipeline(root / "build", "5b", "ddim")
    folder = root / "models" / "vdit" / "toy"
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(cog / part, folder / part)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    family = families.register(Toy())
    torch.manual_seed(0)
    model = ToyDiT(ToyConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    family.save_transformer(model, folder / "transformer", torch.float32)
    yield folder
    families.unregister("toy")


def test_the_toy_family_runs_through_load_pipeline(toy_folder):
    pipe = load_pipeline(toy_folder, device="cpu")
    assert pipe.family.name == "toy" and pipe.fps == 12 and pipe.name == "toy" and pipe.default_size == (9, 32, 48)
    cond = pipe.encode_prompt("a red circle moving right")
    assert set(cond) == {"context", "context_mask"} and cond["context_mask"].sum() < cond["context_mask"].numel()
    frames = pipe(prompt="a red circle moving right", seed=3, progress=False)
    assert frames.shape == (9, 32, 48, 3) and torch.isfinite(frames).all()
    other = pipe(prompt="a blue square moving up", seed=3, progress=False)
    assert (frames - other).abs().max() > 1e-3  # the prompt (through the masked cross-attention) matters
    with pytest.raises(ValueError, match="num_frames=8: Toy takes 4k\\+1 frames"):
        pipe(prompt="x", num_frames=8, progress=False)
    # detection names the toy family's files, and a Toy file in a CogVideoX loader says what it is
    with pytest.raises(CheckpointError, match="expected a CogVideoX transformer, but this looks like a Toy transformer"):
        families.get("cogvideox").load_transformer(toy_folder / "transformer", torch.float32, "cpu")


def test_the_toy_family_runs_through_the_node_graph(toy_folder):
    pack = load_pack()
    nodes, comfy = pack.NODE_CLASS_MAPPINGS, __import__(f"{pack.__name__}.nodes.comfy", fromlist=["x"])
    comfy.set_paths(models=toy_folder.parents[1], output=toy_folder.parents[1] / "output")
    assert "toy/" in nodes["VDITModelLoader"].INPUT_TYPES()["required"]["model"][0]
    model = nodes["VDITModelLoader"]().load("toy/", "default", "auto")[0]
    te = nodes["VDITTextEncoderLoader"]().load("toy/", "default", 0)[0]
    vae = nodes["VDITVAELoader"]().load("toy/", "default", "auto")[0]
    pos = nodes["VDITTextEncode"]().encode(te, "a red circle moving right")[0]
    neg = nodes["VDITTextEncode"]().encode(te, "")[0]
    latent = nodes["VDITEmptyLatent"]().generate(model, 48, 32, 9, 1)[0]
    out = nodes["VDITSampler"]().sample(model, pos, neg, latent, seed=3, steps=4, cfg=3.0, sampler="default", schedule="default", denoise=1.0)[0]
    frames = nodes["VDITVAEDecode"]().decode(vae, out, 2, "auto", 0, 0)[0]
    expected = load_pipeline(toy_folder, device="cpu")(prompt="a red circle moving right", seed=3, progress=False)
    assert frames.shape == (9, 32, 48, 3) and (frames - expected).abs().max() < 1e-5


def test_the_toy_family_trains_with_the_trainer(toy_folder, tmp_path):
    from test_train import make_data

    from vdit_core.train.trainer import main

    data = make_data(tmp_path / "data", 2)
    common = ["--model", str(toy_folder), "--data", str(data), "--frames", "9", "--height", "32", "--width", "48",
              "--cache-dir", str(tmp_path / "cache"), "--steps", "3", "--validation-prompt", "a red square moving right",
              "--validation-steps", "2"]
    assert main([*common, "--output", str(tmp_path / "lora"), "--lora-rank", "4", "--lr", "1e-2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "lora" / "losses.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert re.search(r"lora_targets = \"blocks", (tmp_path / "lora" / "config.toml").read_text())  # the family's, recorded
    assert len(list((tmp_path / "lora" / "validation").rglob("*.mp4"))) == 1
    pipe = load_pipeline(toy_folder, device="cpu")
    base = pipe(prompt="a red square moving right", seed=0, progress=False)
    pipe.load_lora(tmp_path / "lora" / "lora.safetensors")
    assert (pipe(prompt="a red square moving right", seed=0, progress=False) - base).abs().max() > 1e-4
    # a full finetune writes a transformer the family loads back
    assert main([*common, "--output", str(tmp_path / "full"), "--full"]) == 0
    tuned = families.get("toy").load_transformer(tmp_path / "full" / "transformer", torch.float32, "cpu")
    assert any((a - b).abs().max() > 0 for a, b in zip(tuned.state_dict().values(), pipe.transformer.state_dict().values()))


def test_the_generic_layers_import_no_family_module():
    """nodes/, the trainer, the pipeline and the CLI reach models only through the registry."""
    paths = [*sorted((ROOT / "nodes").glob("*.py")), *sorted((ROOT / "vdit_core" / "train").glob("*.py")),
             ROOT / "vdit_core" / "pipeline.py", ROOT / "vdit_core" / "generate.py"]
    pattern = re.compile(r"^\s*(from|import)\s+\S*(models\.|vae\.cogvideox|families\.cogvideox|families import cogvideox)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in paths if pattern.search(p.read_text())]
    assert offenders == []


def test_a_family_registers_its_file_signatures_and_takes_them_away():
    """Detection (vdit_core.detect, which the loaders read) knows a family's files from its
    registration to its unregistration."""
    from vdit_core.checkpoint import describe

    probe = type("Probe", (families.Family,), {"name": "probe", "label": "Probe",
                                                "signatures": (families.Signature("a Probe transformer", lambda k: "probe_in.weight" in k, "probe", "transformer"),)})()
    keys = {"probe_in.weight"}
    assert describe(keys).startswith("an unrecognised state dict")
    families.register(probe)
    try:
        assert describe(keys) == families.describe(keys) == "a Probe transformer"
        assert families.detect(keys).family == "probe" and families.signatures()[-len(families.OTHER_SIGNATURES) - 1].label == "a Probe transformer"
    finally:
        families.unregister("probe")
    assert describe(keys).startswith("an unrecognised state dict") and "probe" not in families.FAMILIES
