"""Samplers against diffusers' schedulers, driven by the same deterministic network, in float64.

The network sees identical timesteps in both runs; outputs agree to float64 round-off, except
where diffusers keeps its sigma table in float32 (Euler family: about 1e-6 relative).
"""

import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vdit_core.prediction import EpsPrediction, FlowPrediction, VPrediction, X0Prediction  # noqa: E402
from vdit_core.sampling import (  # noqa: E402
    FLOW,
    SAMPLERS,
    VE,
    SeededNoise,
    prior_sample,
    sample_cogvideox_dpm,
)
from vdit_core.schedules import DiscreteSchedule, DiscreteScheduleConfig, FlowSchedule, flow_sigmas  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
COG2B = dict(ZERO_SNR, snr_shift_scale=3.0)
SHAPE = (2, 3, 4, 5)


def net(x, t):
    """A smooth, nonlinear, timestep-dependent stand-in for a network."""
    tt = t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return 0.5 * torch.tanh(x) * torch.cos(tt / 300) + 0.1 * x.roll(1, -1) + 0.01 * tt / 1000


class Recorder:
    def __init__(self):
        self.timesteps = []

    def __call__(self, x, t):
        self.timesteps.append(float(t[0]))
        return net(x.double(), t.double())


def _noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _schedule(cfg, cls_name=""):
    return DiscreteSchedule.from_config(DiscreteScheduleConfig.from_diffusers({**cfg, "_class_name": cls_name}))


def _same_table(sched, cfg, cls_name=""):
    """Our schedule on the reference's own alpha_bar table (construction is tested elsewhere;
    some diffusers schedulers build it in float32)."""
    config = DiscreteScheduleConfig.from_diffusers({**cfg, "_class_name": cls_name})
    return DiscreteSchedule(sched.alphas_cumprod.double(), config)


def run_diffusers(sched, n, step_kwargs=None, vp=True):
    """Generic diffusers loop; returns (final sample, timesteps the network saw, initial latent)."""
    sched.set_timesteps(n)
    latents = _noise() * sched.init_noise_sigma
    start = latents.clone()
    seen = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        seen.append(float(t))
        out = net(inp, t.expand(SHAPE[0]).double())
        latents = sched.step(out, t, latents, **(step_kwargs or {})).prev_sample
    return latents, seen, start


def run_ours(name, pred, schedule, sigmas, start_vp, **kw):
    rec = Recorder()
    denoiser = pred(rec, schedule)
    s0 = float(sigmas[0])
    x = start_vp if math.isinf(s0) else start_vp * math.sqrt(1 + s0 * s0)  # same start as diffusers
    out = SAMPLERS[name](denoiser, x, sigmas, disable=True, **kw)
    return out, rec.timesteps


def _gen_sampler(seed, dtype=torch.float64):
    """Draws what ``randn_tensor(shape, generator, dtype=dtype)`` draws, as float64."""
    g = torch.Generator().manual_seed(seed)
    return lambda s, sn: torch.randn(SHAPE, generator=g, dtype=dtype).double()


VP_CASES = [
    # sampler, diffusers class, config, spacing, steps, step kwargs, stochastic
    ("ddim", "DDIMScheduler", SD, "trailing", 25, {}, False),
    ("ddim", "DDIMScheduler", SD, "leading", 20, {}, False),
    ("ddim", "DDIMScheduler", ZERO_SNR, "trailing", 50, {}, False),
    ("ddim", "CogVideoXDDIMScheduler", COG2B, "trailing", 50, {}, False),
    ("ddim", "DDIMScheduler", SD, "trailing", 25, {"eta": 0.6}, True),
    ("ddpm", "DDPMScheduler", SD, "trailing", 25, {}, True),
    ("ddpm", "DDPMScheduler", SD, "leading", 30, {}, True),
    ("ddpm", "DDPMScheduler", ZERO_SNR, "trailing", 20, {}, True),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", SD, "trailing", 20, {}, False),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", SD, "trailing", 8, {}, False),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", SD, "trailing", 20, {}, True),
    ("unipc", "UniPCMultistepScheduler", SD, "trailing", 20, {}, False),
    ("unipc", "UniPCMultistepScheduler", SD, "trailing", 6, {}, False),
]


@pytest.mark.parametrize("name,cls,cfg,spacing,n,kw,stochastic", VP_CASES)
def test_vp_sampler_matches_diffusers(name, cls, cfg, spacing, n, kw, stochastic):
    extra = dict(prediction_type="v_prediction", timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    if cls in ("DDIMScheduler", "CogVideoXDDIMScheduler", "DDPMScheduler"):
        extra["clip_sample"] = False
    if name == "dpmpp_2m_sde":
        extra["algorithm_type"] = "sde-dpmsolver++"
    sched = getattr(diffusers, cls)(**cfg, **extra)
    step_kw = dict(kw)
    ours_kw = {"eta": kw["eta"]} if "eta" in kw else {}
    if stochastic:
        step_kw["generator"] = torch.Generator().manual_seed(7)
        # DPM-Solver's SDE draws its noise in float32
        ours_kw["noise_sampler"] = _gen_sampler(7, torch.float32 if name == "dpmpp_2m_sde" else torch.float64)
    ref, ref_ts, start = run_diffusers(sched, n, step_kw)
    schedule = _same_table(sched, {**cfg, **extra}, cls)
    sigmas = schedule.get_sigmas(n, spacing)
    out, ts = run_ours(name, VPrediction, schedule, sigmas, start, **ours_kw)
    assert ts == ref_ts
    err = (out - ref).abs().max().item()
    # diffusers computes its coefficients from alpha_bar in the table's dtype (float32 for all
    # but the CogVideoX schedulers), so float32 round-off is the floor of the comparison there
    tol = 1e-12 if sched.alphas_cumprod.dtype == torch.float64 else 2e-6
    assert err < tol * max(1.0, ref.abs().max().item()), err


def _takes_noise(name):
    return "noise_sampler" in inspect.signature(SAMPLERS[name]).parameters


def test_cogvideox_dpm_matches_diffusers_with_fixed_generator():
    # Step counts dividing 1000: diffusers' CogVideoX schedulers step to t - 1000 // n, which is
    # not their own next trailing timestep otherwise (we follow the timesteps).
    for cfg in (COG2B, dict(ZERO_SNR, snr_shift_scale=1.0)):
        for n in (50, 8):
            sched = diffusers.CogVideoXDPMScheduler(
                **cfg, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
            )
            sched.set_timesteps(n)
            g = torch.Generator().manual_seed(3)
            x, old = _noise(), None
            for i, t in enumerate(sched.timesteps):
                out = net(x, t.expand(SHAPE[0]).double())
                back = sched.timesteps[i - 1] if i > 0 else None
                x, old = sched.step(out, old, t, back, x, generator=g, return_dict=False)
            schedule = _schedule(cfg, "CogVideoXDPMScheduler")
            ours = sample_cogvideox_dpm(
                VPrediction(net, schedule),
                prior_sample(_noise(), math.inf),
                schedule.get_sigmas(n, "trailing"),
                disable=True,
                noise_sampler=_gen_sampler(3),
            )
            assert (ours - x).abs().max().item() < 1e-12


EULER_CASES = [
    ("euler", "EulerDiscreteScheduler", "trailing", {}),
    ("euler", "EulerDiscreteScheduler", "leading", {}),
    ("euler", "EulerDiscreteScheduler", "karras", {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", "trailing", {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", "leading", {}),
    ("heun", "HeunDiscreteScheduler", "trailing", {}),
    ("heun", "HeunDiscreteScheduler", "karras", {}),
]


@pytest.mark.parametrize("name,cls,spacing,kw", EULER_CASES)
def test_ve_sampler_matches_diffusers(name, cls, spacing, kw):
    extra = dict(prediction_type="v_prediction", timestep_spacing="linspace" if spacing == "karras" else spacing)
    if spacing == "leading":
        extra["steps_offset"] = 1
    if spacing == "karras":
        extra["use_karras_sigmas"] = True
    sched = getattr(diffusers, cls)(**SD, **extra)
    stochastic = name == "euler_ancestral"
    step_kw = {"generator": torch.Generator().manual_seed(5)} if stochastic else {}
    ref, ref_ts, start = run_diffusers(sched, 15, step_kw)
    schedule = _same_table(sched, {**SD, **extra})
    sigmas = schedule.get_sigmas(15, spacing)
    rec = Recorder()
    ours_kw = {"noise_sampler": _gen_sampler(5)} if stochastic else {}
    out = SAMPLERS[name](VPrediction(rec, schedule), start, sigmas, disable=True, **ours_kw)
    # diffusers passes the float32 copy of its timesteps; Karras timesteps are fractional
    assert torch.allclose(
        torch.tensor(rec.timesteps, dtype=torch.float64), torch.tensor(ref_ts, dtype=torch.float64), atol=2e-3
    )
    if spacing != "karras":
        assert rec.timesteps == ref_ts
    err = (out - ref).abs().max().item()
    assert err < 2e-5, err  # float32 sigma table in diffusers


@pytest.mark.parametrize("pred,ptype", [(EpsPrediction, "epsilon"), (X0Prediction, "sample")])
def test_other_prediction_types_match_diffusers_ddim(pred, ptype):
    sched = diffusers.DDIMScheduler(**SD, prediction_type=ptype, timestep_spacing="trailing", clip_sample=False)
    ref, ref_ts, start = run_diffusers(sched, 20)
    schedule = _same_table(sched, SD)
    out, ts = run_ours("ddim", pred, schedule, schedule.get_sigmas(20, "trailing"), start)
    assert ts == ref_ts
    # float32 alpha_bar in DDIMScheduler
    assert (out - ref).abs().max().item() < 2e-6 * max(1.0, ref.abs().max().item())


def test_eps_prediction_refuses_infinite_sigma():
    schedule = _schedule(ZERO_SNR)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        EpsPrediction(net, schedule)(_noise(), math.inf)


def test_flow_euler_matches_opensora_and_diffusers():
    n, ratio = 12, 2.5
    sigmas = flow_sigmas(n, ratio)
    # Open-Sora 1.2's loop: z += v * (t_i - t_{i+1}) / T, v predicting x0 - eps
    z = _noise()
    ts = [float(s) * 1000 for s in sigmas]
    for i in range(n):
        v = net(z, torch.full((SHAPE[0],), ts[i], dtype=torch.float64))
        z = z + v * (ts[i] - ts[i + 1]) / 1000
    ours = SAMPLERS["flow_euler"](
        FlowPrediction(net, FlowSchedule(), velocity="x0_minus_noise"), prior_sample(_noise(), 1.0), sigmas, disable=True
    )
    assert (ours - z).abs().max().item() < 1e-12

    # diffusers FlowMatchEulerDiscreteScheduler (SD3): v predicts eps - x0
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    x = _noise()
    for t in sched.timesteps:
        x = sched.step(net(x, t.expand(SHAPE[0]).double()), t, x).prev_sample
    ours = SAMPLERS["euler"](
        FlowPrediction(net, FlowSchedule()), _noise(), sched.sigmas.double(), disable=True
    )
    assert (ours - x).abs().max().item() < 1e-5  # diffusers' float32 sigmas


def test_callback_and_progress_contract():
    schedule = _schedule(COG2B, "CogVideoXDDIMScheduler")
    sigmas = schedule.get_sigmas(5, "trailing")
    for name, fn in SAMPLERS.items():
        calls = []
        fn(VPrediction(net, schedule), prior_sample(_noise(), sigmas[0]), sigmas, callback=calls.append, disable=True)
        assert [c["i"] for c in calls][:1] == [0] and len(calls) >= 5, name
        assert {"i", "x", "sigma", "denoised"} <= set(calls[0]), name
        assert all(torch.isfinite(c["denoised"]).all() for c in calls), name


def test_seeded_noise_reproducible_and_batch_independent():
    a = SeededNoise(11, (3, 2, 4, 4))
    b = SeededNoise(11, (3, 2, 4, 4))
    first_a, first_b = a(), b()
    assert torch.equal(first_a, first_b) and torch.equal(a(), b())
    single = SeededNoise(12, (1, 2, 4, 4))
    assert torch.equal(single(), first_a[1:2])
    # a layout permutation draws in another order and reproduces that implementation's noise
    perm = SeededNoise(0, (1, 2, 3, 4, 4), permute=(1, 0, 2, 3))()
    ref = torch.randn((1, 3, 2, 4, 4), generator=torch.Generator().manual_seed(0)).permute(0, 2, 1, 3, 4)
    assert torch.equal(perm, ref)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_stochastic_runs_are_batch_independent(name):
    schedule = _schedule(SD)
    sigmas = schedule.get_sigmas(6, "trailing")
    shape = (3, 2, 4, 4)

    def run(seed, batch):
        noise = SeededNoise(seed, (batch,) + shape[1:])
        x = prior_sample(noise(), sigmas[0])
        kw = {"noise_sampler": noise} if _takes_noise(name) else {}
        return SAMPLERS[name](VPrediction(lambda x, t: torch.tanh(x), schedule), x, sigmas, disable=True, **kw)

    big = run(4, 3)
    assert torch.allclose(big[2:3], run(6, 1), atol=1e-6, rtol=1e-6)
    assert torch.equal(run(4, 3), big)


# ----------------------------------------------------------------------------------------------
# Convergence on an analytic problem


class GaussianMixture:
    """2-D isotropic Gaussian mixture with its exact denoiser E[x0 | x]."""

    def __init__(self, form):
        self.noise_form = form
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
        self.mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
        self.s = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    def __call__(self, x, sigma):
        alpha = torch.tensor([self.noise_form.alpha(float(s)) for s in sigma], dtype=x.dtype)
        sig = sigma.to(x.dtype)
        blind = torch.isinf(sig) | (alpha <= 0)  # no information left: the prior mean
        a = torch.where(blind, torch.ones_like(alpha), alpha)
        z = x / a[:, None]
        s2 = torch.where(blind, torch.zeros_like(sig), sig / a) ** 2
        var = self.s**2 + s2[:, None]  # [B, K]
        logp = self.w.log() - ((z[:, None] - self.mu) ** 2).sum(-1) / (2 * var) - var.log()
        g = torch.softmax(logp, 1)
        post = (self.s[:, None] ** 2 * z[:, None] + s2[:, None, None] * self.mu) / var[..., None]
        out = (g[..., None] * post).sum(1)
        return torch.where(blind[:, None], (self.w[:, None] * self.mu).sum(0).expand_as(out), out)


def _check_distribution(samples, gm, ref):
    from scipy.stats import ks_2samp

    assert torch.isfinite(samples).all()
    assert torch.allclose(samples.mean(0), ref.mean(0), atol=0.15)
    assert torch.allclose(samples.std(0), ref.std(0), atol=0.15)
    nearest = torch.cdist(samples, gm.mu).argmin(1)
    frac = torch.bincount(nearest, minlength=3).double() / len(samples)
    assert torch.allclose(frac, gm.w, atol=0.05), frac
    for d in range(2):
        assert ks_2samp(samples[:, d].numpy(), ref[:, d].numpy()).pvalue > 1e-3


SIGMA_SETS = {
    "karras": lambda: __import__("vdit_core.schedules", fromlist=["x"]).karras_sigmas(40, 0.01, 80.0),
    "zero_snr": lambda: _schedule(COG2B, "CogVideoXDDIMScheduler").get_sigmas(40, "trailing"),
    "flow": lambda: flow_sigmas(40, 3.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("sigma_set", sorted(SIGMA_SETS))
def test_sampler_converges_on_gaussian_mixture(name, sigma_set):
    gm = GaussianMixture(FLOW if sigma_set == "flow" else VE)
    sigmas = SIGMA_SETS[sigma_set]()
    n = 1500
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    kw = {}
    if _takes_noise(name):
        kw["noise_sampler"] = lambda s, sn: torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out = SAMPLERS[name](gm, prior_sample(noise, sigmas[0]), sigmas, disable=True, **kw)
    _check_distribution(out, gm, gm.sample(n, torch.Generator().manual_seed(1)))
