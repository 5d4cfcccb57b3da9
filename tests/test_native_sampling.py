"""vdit's sampling features in ComfyUI's own custom sampling (nodes/native_sampling.py): VDIT
Sampler Select's SAMPLER, the VDIT Dynamic CFG Guider and the VDIT Step Cache model patch, run by
ComfyUI's real BasicScheduler and SamplerCustomAdvanced, against vdit_core's pipeline on the same
noise, conditioning and sigmas. Needs ComfyUI (``VDIT_COMFYUI``, see test_native.py); skipped
elsewhere."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("VDIT_COMFYUI")
if not COMFY or not (Path(COMFY) / "comfy" / "model_base.py").is_file():
    pytest.skip("VDIT_COMFYUI does not name a ComfyUI checkout", allow_module_level=True)
sys.path.insert(0, COMFY)

import comfy.cli_args  # noqa: E402

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True  # ComfyUI's --cpu
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from comfy_extras import nodes_custom_sampler as custom  # noqa: E402

import native_cases  # noqa: E402
from report import REPORT  # noqa: E402
from test_package import load_pack  # noqa: E402
from vdit_core.pipeline import Pipeline  # noqa: E402
from vdit_core.sampling import STOCHASTIC_SAMPLERS, SeededNoise  # noqa: E402

PACK = load_pack()
native = __import__(f"{PACK.__name__}.nodes.native", fromlist=["x"])
NODES = PACK.NODE_CLASS_MAPPINGS
SEED = 42


class GivenNoise:
    """A NOISE (what RandomNoise gives SamplerCustomAdvanced): the given initial noise, and the seed
    the run's samplers get."""

    def __init__(self, noise: torch.Tensor, seed: int):
        self.noise, self.seed = noise, seed

    def generate_noise(self, latent):
        return self.noise.clone()


def model_of(case, name):
    folder = native_cases.demo_folder() if name == "demo" else None
    return native.native_model(case.transformer, case.family, folder, name, case.defaults)


def basic_sigmas(model, steps: int) -> torch.Tensor:
    """BasicScheduler's simple schedule (the SIGMAS SamplerCustomAdvanced is given)."""
    return custom.BasicScheduler().get_sigmas(model, "simple", steps, 1.0)[0]


def run_sigmas(model, case, sigmas: torch.Tensor) -> torch.Tensor:
    """The sigmas the run uses: a flow model's OUTER_SAMPLE wrapper shifts them for the latent size."""
    if isinstance(model.get_model_object("model_sampling"), native.Flow):
        return native.time_shift(sigmas.double(), case.family.sigma_shift(tuple(case.noise.shape), 8)).float()
    return sigmas


def sample_advanced(model, case, guider, sampler, noise: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """ComfyUI's SamplerCustomAdvanced on BasicScheduler's sigmas, from ``noise`` with the run's
    seed: model-space latents."""
    latent = {"samples": torch.zeros_like(noise)}
    with torch.no_grad():
        out = custom.SamplerCustomAdvanced().sample(GivenNoise(noise, seed), guider, sampler, basic_sigmas(model, case.steps), latent)[0]
    return model.model.process_latent_in(out["samples"])


def guider_of(model, case, dynamic: bool = False):
    family = model.model.vdit_family
    positive, negative = native.conditioning(family, case.cond), native.conditioning(family, case.uncond)
    if dynamic:
        return NODES["VDITDynamicCFGGuider"]().get_guider(model, positive, negative, case.cfg)[0]
    return custom.CFGGuider().get_guider(model, positive, negative, case.cfg)[0]


def pipeline(case) -> Pipeline:
    defaults = {k: v for k, v in case.defaults.items() if k != "latent_rgb"}
    return Pipeline(transformer=case.transformer, vae=None, text_encoder=None, family=case.family, **defaults)


def pipeline_run(pipe, case, sigmas, sampler, dynamic=False, step_cache=0.0):
    """vdit_core's pipeline with the seed SEED (initial noise and the sampler's) on the given sigmas:
    (its initial noise, model-space latents)."""
    request = pipe.prepare(cond=case.cond, uncond=case.uncond, latents=case.noise, seed=SEED, steps=case.steps, cfg=case.cfg,
                           sampler=sampler, dynamic_cfg=dynamic)
    with torch.no_grad():
        out = pipe.run(dataclasses.replace(request, sigmas=sigmas.double()), progress=False, step_cache=step_cache)
    return request.noise, out


def check_close(label: str, theirs: torch.Tensor, ours: torch.Tensor) -> float:
    err = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"{label}: max |ComfyUI - pipeline| = {err:.2e} (latents up to {scale:.2f})")
    assert err < 1e-4 * max(1.0, scale), label
    return err


SAMPLERS = list(PACK.nodes.native_sampling.SAMPLER_CHOICES)


@pytest.mark.parametrize("name", ["demo", "cogvideox-5b", "opensora"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_select_matches_the_pipeline(name, sampler):
    """VDIT Sampler Select's SAMPLER in SamplerCustomAdvanced (CFGGuider, BasicScheduler simple)
    gives the pipeline's run of that sampler on the same sigmas, from the pipeline's seeded initial
    noise: the stochastic ones draw the pipeline's noise for the run's seed. Open-Sora: the flow
    form (ComfyUI's CONST sampling)."""
    case = native_cases.case(name)
    model = model_of(case, name)
    noise, ours = pipeline_run(pipeline(case), case, run_sigmas(model, case, basic_sigmas(model, case.steps)), sampler)
    theirs = sample_advanced(model, case, guider_of(model, case), NODES["VDITSamplerSelect"]().select(sampler)[0], noise)
    err = check_close(f"{name} {sampler}", theirs, ours)
    REPORT[f"native sampler {name} {sampler}: max |SamplerCustomAdvanced - pipeline|"] = f"{err:.1e}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_choices_are_not_comfyuis_own(sampler):
    """Each choice is missing from ComfyUI or differs from its sampler of the same name (given the
    same fresh noise): UniPC on CogVideoX, the others on a flow model (Open-Sora)."""
    theirs_name = {"unipc": "uni_pc_bh2"}.get(sampler, sampler)
    if theirs_name not in comfy.samplers.SAMPLER_NAMES:
        return
    name = "cogvideox-5b" if sampler == "unipc" else "opensora"
    case = native_cases.case(name)
    model = model_of(case, name)
    noise = lambda: {"noise_sampler": SeededNoise(7, case.noise.shape)} if sampler in STOCHASTIC_SAMPLERS else {}  # noqa: E731
    ours = sample_advanced(model, case, guider_of(model, case), comfy.samplers.KSAMPLER(native.VDITSamplerFunction(sampler), noise()), case.noise)
    if theirs_name == "uni_pc_bh2":
        theirs = comfy.samplers.sampler_object(theirs_name)
    else:
        theirs = comfy.samplers.ksampler(theirs_name, noise())
    diff = (ours - sample_advanced(model, case, guider_of(model, case), theirs, case.noise)).abs().max().item()
    REPORT[f"native sampler {sampler} vs ComfyUI's {theirs_name} on {name}: max difference"] = f"{diff:.2f} (latents up to {ours.abs().max().item():.1f})"
    assert diff > 1e-2


def test_stochastic_samplers_follow_the_runs_seed():
    """Another seed, other fresh noise; the same seed, the same result."""
    case = native_cases.case("cogvideox-5b")
    model = model_of(case, "cogvideox-5b")
    sampler = NODES["VDITSamplerSelect"]().select("cogvideox_dpm")[0]
    guider = guider_of(model, case)
    a = sample_advanced(model, case, guider, sampler, case.noise)
    assert torch.equal(a, sample_advanced(model, case, guider, sampler, case.noise))
    b = sample_advanced(model, case, guider, sampler, case.noise, seed=SEED + 1)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["demo", "cogvideox-5b"])
def test_dynamic_cfg_guider_matches_the_pipeline(name):
    """VDIT Dynamic CFG Guider with cogvideox_dpm gives the pipeline's dynamic_cfg run; the dynamic
    scale makes a difference."""
    case = native_cases.case(name)
    model = model_of(case, name)
    sampler = NODES["VDITSamplerSelect"]().select("cogvideox_dpm")[0]
    noise, ours = pipeline_run(pipeline(case), case, basic_sigmas(model, case.steps), "cogvideox_dpm", dynamic=True)
    theirs = sample_advanced(model, case, guider_of(model, case, dynamic=True), sampler, noise)
    err = check_close(f"{name} dynamic cfg", theirs, ours)
    REPORT[f"native dynamic cfg {name}: max |SamplerCustomAdvanced - pipeline|"] = f"{err:.1e}"
    constant = sample_advanced(model, case, guider_of(model, case), sampler, noise)
    assert (constant - theirs).abs().max() > 100 * err


def test_dynamic_cfg_guider_follows_the_schedule_per_sigma():
    """The guider's scale at each of the run's sigmas is the family's dynamic scale of that step."""
    case = native_cases.case("cogvideox-5b")
    model = model_of(case, "cogvideox-5b")
    guider = guider_of(model, case, dynamic=True)
    sigmas = basic_sigmas(model, case.steps)
    seen = []
    sampler = comfy.samplers.KSAMPLER(lambda m, x, s, extra_args, callback, disable: seen.append(guider.guidance(s[:1])) or x)
    with torch.no_grad():
        guider.sample(case.noise, torch.zeros_like(case.noise), sampler, sigmas, seed=0, disable_pbar=True)
    scale = case.family.guidance_scale(case.cfg, case.steps, case.defaults["schedule"], True)
    assert seen == [scale(sigmas[:1])]
    assert guider.guidance(sigmas[:1]) == case.cfg  # outside a run: the constant scale
    values = [scale(s[None]) for s in sigmas[:-1]]
    assert len(set(values)) > 1 and all(1.0 <= v <= 1.0 + case.cfg for v in values)


@pytest.mark.parametrize("name", ["opensora", "hunyuandit-v1.2"])
def test_dynamic_cfg_guider_refuses_families_without_it(name):
    case = native_cases.case(name)
    with pytest.raises(ValueError, match="has no dynamic guidance") as info:
        guider_of(model_of(case, name), case, dynamic=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["demo", "cogvideox-5b"])
def test_step_cache_node_matches_the_pipelines_step_cache(name, caplog):
    """VDIT Step Cache: ComfyUI's run (its CFG batch: uncond and cond in one call) skips the
    steps vdit_core's pipeline skips with that threshold and gives its latents, in
    SamplerCustomAdvanced and KSampler; the transformer forgets the cache after the run, the log
    says what was skipped, and the patch stays on its clone."""
    case = native_cases.case(name)
    model = model_of(case, name)
    threshold = {"demo": 0.3, "cogvideox-5b": 0.8}[name]  # (random tiny weights: large changes between steps)
    patched = NODES["VDITStepCache"]().patch(model, threshold)[0]
    assert native.step_cache_run(model) is None and native.step_cache_run(patched).threshold == threshold
    pipe = pipeline(case)
    sigmas = basic_sigmas(model, case.steps)
    noise, ours = pipeline_run(pipe, case, sigmas, "euler", step_cache=threshold)
    expected = (pipe.last_step_cache.computed, pipe.last_step_cache.skipped)
    with caplog.at_level(logging.INFO):
        theirs = sample_advanced(patched, case, guider_of(patched, case), comfy.samplers.sampler_object("euler"), noise)
    run = native.step_cache_run(patched).last
    assert (run.computed, run.skipped) == expected and expected[1] > 0 and sum(expected) == case.steps
    assert case.transformer.step_cache is None
    assert f"{expected[1]} of {case.steps} transformer calls skipped" in caplog.text
    err = check_close(f"{name} step cache", theirs, ours)
    REPORT[f"native step cache {name}: computed/skipped, max |SamplerCustomAdvanced - pipeline|"] = f"{expected[0]}/{expected[1]}, {err:.1e}"
    family = case.family
    with torch.no_grad():  # KSampler's path: the same run
        raw = comfy.sample.sample(patched, noise, case.steps, case.cfg, "euler", "simple", native.conditioning(family, case.cond),
                                  native.conditioning(family, case.uncond), torch.zeros_like(noise), seed=SEED, disable_pbar=True)
    run = native.step_cache_run(patched).last
    assert (run.computed, run.skipped) == expected and torch.allclose(patched.model.process_latent_in(raw), theirs, atol=1e-6)
    plain = sample_advanced(model, case, guider_of(model, case), comfy.samplers.sampler_object("euler"), noise)
    assert (plain - theirs).abs().max() > 100 * err  # the unpatched model runs every step
    off = NODES["VDITStepCache"]().patch(patched, 0.0)[0]
    assert native.step_cache_run(off) is None


def test_step_cache_node_refuses_other_models_and_bad_thresholds():
    case = native_cases.case("cogvideox-5b")
    model = model_of(case, "cogvideox-5b")
    with pytest.raises(ValueError, match="step_cache"):
        NODES["VDITStepCache"]().patch(model, float("nan"))

    class Other:  # a MODEL of another kind
        model = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="not a vdit model"):
        NODES["VDITStepCache"]().patch(Other(), 0.1)
