"""vdit_core's pipeline against ComfyUI's own KSampler, on every machine: the latents ComfyUI's
sampling gave through the native model (``tests/fixtures/native``, written by ``test_native.py``
with ``VDIT_WRITE_FIXTURES=1`` in ComfyUI 0.3.64's venv: euler, the simple scheduler, CFG, the
cases of ``native_cases.py``) are what the pipeline gives on the same noise and sigmas."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import native_cases
from vdit_core.pipeline import Pipeline


@pytest.mark.parametrize("name", native_cases.NAMES)
def test_pipeline_matches_comfyuis_ksampler(name):
    saved = native_cases.load_fixture(name)
    case = native_cases.case(name)
    defaults = {k: v for k, v in case.defaults.items() if k != "latent_rgb"}
    pipe = Pipeline(transformer=case.transformer, vae=None, text_encoder=None, family=case.family, **defaults)
    request = pipe.prepare(cond=case.cond, uncond=case.uncond, noise=case.noise, latents=case.noise, steps=case.steps,
                           cfg=case.cfg, sampler="euler", frame_latents=case.frame_latents)
    with torch.no_grad():
        ours = pipe.run(dataclasses.replace(request, sigmas=saved["sigmas"].double()), progress=False)
    assert ours.shape == saved["latents"].shape
    assert (ours - saved["latents"]).abs().max().item() < 1e-4 * max(1.0, ours.abs().max().item())  # (see test_native.py)
