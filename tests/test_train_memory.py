"""What the trainer puts on the device, and when, as a GPU run would (checked on a CPU): the latent
cache is built first, with the VAE and T5 in half precision, and they are freed before the
transformer takes the device (T5-XXL's encoder alone is 19 GB in float32)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

pytest.importorskip("diffusers")

import tiny  # noqa: E402
from test_train import args, make_data  # noqa: E402
from vdit_core import families  # noqa: E402
from vdit_core.train import trainer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.reference_pipeline(tmp_path_factory.mktemp("train_memory"), "5b", "ddim")[1]


def test_cache_is_built_in_half_precision_before_the_transformer_takes_the_device(model_dir, tmp_path, monkeypatch):
    events, encoders = [], []
    family = families.get("cogvideox")
    real_transformer, real_vae, real_text = family.load_transformer, family.load_vae, family.load_text_encoder

    def load_transformer(path, dtype, device):
        model = real_transformer(path, dtype, device)
        events.append(("transformer", torch.device(device).type))
        to = model.to

        def placed(*a, **k):  # nn.Module.to, recording which encoders are still alive
            events.append(("transformer.to", [r() is not None for r in encoders]))
            return to(*a, **k)

        model.to = placed
        return model

    def load_vae(path, dtype, device, variant=None):
        vae = real_vae(path, dtype, device, variant)
        encoders.append(weakref.ref(vae))
        events.append(("vae", dtype, vae.dtype))
        return vae

    def load_text_encoder(path, dtype, device, tokenizer=None, max_length=0):
        encoder = real_text(path, dtype, device, tokenizer, max_length)
        encoders.append(weakref.ref(encoder.model))
        events.append(("text", dtype, encoder.dtype))
        return encoder

    monkeypatch.setattr(family, "load_transformer", load_transformer)
    monkeypatch.setattr(family, "load_vae", load_vae)
    monkeypatch.setattr(family, "load_text_encoder", load_text_encoder)
    monkeypatch.setattr(trainer, "half_dtype", lambda device: torch.bfloat16, raising=False)  # what a GPU with bfloat16 gets
    data = make_data(tmp_path / "data", 2)
    gc.collect()
    assert trainer.main(args(model_dir, data, tmp_path / "out", "--steps", 1, "--lora-rank", 4)) == 0
    assert [e[0] for e in events] == ["transformer", "vae", "text", "transformer.to"]
    assert events[0][1] == "cpu"  # loaded where it waits while the cache is built
    assert events[1][1:] == (torch.bfloat16, torch.bfloat16) and events[2][1:] == (torch.bfloat16, torch.bfloat16)
    assert events[3][1] == [False, False]  # both encoders freed before the transformer moved
    (cache,) = (tmp_path / "cache").iterdir()  # keyed by the encoders' dtype too: a float32 cache is another one
    assert json.loads((cache / "index.json").read_text())["key"]["encode_dtype"] == "torch.bfloat16"
