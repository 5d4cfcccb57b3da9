"""Schedules against diffusers' definitions."""

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vdit_core.schedules import (  # noqa: E402
    TERMINAL_ALPHA_BAR,
    DiscreteSchedule,
    DiscreteScheduleConfig,
    FlowSchedule,
    flow_sigmas,
    make_betas,
    karras_sigmas,
    time_shift,
)

from tiny import COG2B_SCHEDULER as COGVIDEOX_2B  # noqa: E402


def _ours(cfg: dict, cls_name: str = "") -> DiscreteSchedule:
    return DiscreteSchedule.from_config(DiscreteScheduleConfig.from_diffusers({**cfg, "_class_name": cls_name}))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    cfg = dict(beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)
    ref = diffusers.DDIMScheduler(**cfg).alphas_cumprod.double()
    ours = _ours(cfg).alphas_cumprod
    # diffusers accumulates linear/cosine betas in float32; ours are float64 throughout
    assert torch.allclose(ours, ref, rtol=2e-5, atol=0)
    if beta_schedule == "squaredcos_cap_v2":
        betas32 = make_betas(DiscreteScheduleConfig.from_diffusers(cfg)).float()
        assert torch.equal(torch.cumprod(1 - betas32, 0).double(), ref)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_cogvideox_snr_shift_and_zero_terminal_snr(shift):
    cfg = {**COGVIDEOX_2B, "snr_shift_scale": shift}
    ref = diffusers.CogVideoXDDIMScheduler(**cfg).alphas_cumprod.double()
    ours = _ours(cfg, "CogVideoXDDIMScheduler")
    assert torch.allclose(ours.alphas_cumprod, ref, rtol=1e-12, atol=1e-15)
    assert ours.alphas_cumprod[-1] == 0 and math.isinf(ours.sigma_max)
    if shift == 3.0:  # the figure quoted in the CogVideoX notes
        assert abs(float(ours.alphas_cumprod[0]) - 0.997454) < 1e-6


def test_missing_snr_shift_defaults_like_diffusers():
    cfg = {k: v for k, v in COGVIDEOX_2B.items() if k != "snr_shift_scale"}
    assert DiscreteScheduleConfig.from_diffusers({**cfg, "_class_name": "CogVideoXDDIMScheduler"}).snr_shift_scale == 3.0
    assert DiscreteScheduleConfig.from_diffusers({**cfg, "_class_name": "DDIMScheduler"}).snr_shift_scale == 1.0


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("n", [1, 7, 30, 50])
def test_integer_spacings_match_ddim_and_euler(spacing, n):
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ddim.set_timesteps(n)
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    euler.set_timesteps(n)
    ours = _ours({"timestep_spacing": spacing, "steps_offset": 1}).timesteps(n)
    assert torch.equal(ours, ddim.timesteps.double())
    assert torch.equal(ours, euler.timesteps.double())


@pytest.mark.parametrize("n", [5, 25, 50])
def test_linspace_spacing_matches_euler(n):
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace")
    euler.set_timesteps(n)
    ours = _ours({"timestep_spacing": "linspace"}).timesteps(n)
    assert torch.allclose(ours, euler.timesteps.double(), atol=1e-4)  # diffusers stores float32


def test_sigma_timestep_roundtrip_integer_and_fractional():
    for cfg in ({}, COGVIDEOX_2B):
        s = _ours(cfg, "CogVideoXDDIMScheduler")
        t = torch.arange(0, 1000, dtype=torch.float64)
        sig = s.sigma(t)
        assert torch.equal(s.timestep(sig), t)  # integers are exact
        ac = s.alphas_cumprod
        assert torch.allclose(sig[:-1], ((1 - ac[:-1]) / ac[:-1]).sqrt(), rtol=1e-14)
        tf = torch.linspace(0, 999, 4001, dtype=torch.float64)
        # exact inverse, except where sigma reaches ComfyUI's finite stand-in for the zero-SNR end
        # (TERMINAL_ALPHA_BAR), read as T-1 so that ComfyUI's sigma table and ours meet there
        below = s.sigma(tf) < (1 / TERMINAL_ALPHA_BAR - 1) ** 0.5
        back = s.timestep(s.sigma(tf))
        assert torch.allclose(back[below], tf[below], atol=1e-9)
        assert torch.all(back[~below] == 999) and (~below).sum() <= 4  # within the last timestep
        assert torch.all(s.sigma(tf).diff() > 0)  # monotone, finite before T-1
    zsnr = _ours(COGVIDEOX_2B, "CogVideoXDDIMScheduler")
    assert math.isinf(float(zsnr.sigma(999.0))) and float(zsnr.timestep(math.inf)) == 999.0
    assert float(zsnr.timestep((1 / TERMINAL_ALPHA_BAR - 1) ** 0.5)) == 999.0
    assert math.isfinite(float(zsnr.sigma(998.5)))


def test_karras_sigmas_match_diffusers():
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    ref = diffusers.EulerDiscreteScheduler(**cfg, use_karras_sigmas=True)
    ref.set_timesteps(20)
    ours = _ours(cfg).get_sigmas(20, "karras")
    # diffusers' Euler builds its sigma table from float32 alpha_bar (about 1e-5 relative error)
    assert torch.allclose(ours, ref.sigmas.double(), rtol=3e-5)
    assert ours[-1] == 0 and torch.all(ours[:-1].diff() < 0)
    with pytest.raises(ValueError):
        karras_sigmas(10, 0.0, 1.0)


def test_flow_schedule_and_shift():
    # an SD3 / Open-Sora style shift: t_i = (1 - i/N) T, then ratio*t / (1 + (ratio-1) t), last step to 0
    # (Open-Sora's own float32 transform is checked against the official table in test_opensora)
    ratio = math.sqrt(480 * 854 / 512**2) * math.sqrt(15)
    n = 30
    ref = [(1 - i / n) for i in range(n)]
    ref = [ratio * t / (1 + (ratio - 1) * t) for t in ref] + [0.0]
    assert torch.allclose(flow_sigmas(n, ratio), torch.tensor(ref, dtype=torch.float64), atol=1e-15)
    fs = FlowSchedule()
    assert float(fs.timestep(0.25)) == 250.0 and float(fs.sigma(250)) == 0.25
    assert torch.allclose(time_shift(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteScheduleConfig.from_diffusers({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="steps"):
        _ours({}).timesteps(0)
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="spacing"):
        _ours({}).timesteps(10, "bogus")
    np.testing.assert_equal(_ours({}).get_sigmas(3, "trailing")[-1].item(), 0.0)
