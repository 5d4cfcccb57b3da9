"""Denoiser losses, timestep samplers and guidance."""

import math

import pytest
import torch

from vdit_core.guidance import CFGDenoiser, cogvideox_dynamic_cfg
from vdit_core.prediction import EpsPrediction, FlowPrediction, VPrediction, X0Prediction
from vdit_core.sampling import FLOW, VE, sample_euler
from vdit_core.schedules import DiscreteSchedule, DiscreteScheduleConfig, FlowSchedule
from vdit_core.timesteps import logit_normal_sigmas, stratified_bands, stratified_timesteps, uniform_timesteps

COG = DiscreteScheduleConfig(snr_shift_scale=3.0, zero_terminal_snr=True, timestep_spacing="trailing")


class TinyNet(torch.nn.Module):
    def __init__(self, c=3, out_mult=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c * out_mult, 3, padding=1)
        self.emb = torch.nn.Linear(1, c * out_mult)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t[:, None].float() / 1000)[:, :, None, None]


def _data(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 6, 6, generator=g), torch.randn(b, 3, 6, 6, generator=g)


def test_v_loss_is_cogvideox_weighted_x0_loss():
    """SAT VideoDiffusionLoss: mean(w * (x0_hat - x0)^2), w = 1/(1 - alpha_bar): equal to v-MSE."""
    torch.manual_seed(0)
    sched = DiscreteSchedule.from_config(COG)
    net = TinyNet()
    x0, noise = _data()
    t = torch.tensor([0, 250, 700, 998])
    sigma = sched.sigma(t)
    ab = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v_hat = net(x_t, t.float())
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v_hat
    sat = ((x0_hat - x0) ** 2 / (1 - ab)).flatten(1).mean(1)
    ours = VPrediction(net, sched).loss(x0, noise, sigma)
    assert torch.allclose(ours, sat, rtol=1e-5, atol=1e-6)
    assert torch.allclose(VPrediction(net, sched).loss(x0, noise, sigma, weighting="v"), ours)


def test_loss_and_sampling_share_the_denoiser():
    """The loss scores exactly the x0 estimate the sampler would get at that noise level."""
    torch.manual_seed(0)
    sched = DiscreteSchedule.from_config(DiscreteScheduleConfig())
    x0, noise = _data()
    sigma = sched.sigma(torch.tensor([10.0, 300.0, 600.0, 900.0]))
    for cls in (EpsPrediction, VPrediction, X0Prediction):
        d = cls(TinyNet(), sched)
        x0_hat = d(x0 + noise * sigma.view(-1, 1, 1, 1).float(), sigma)
        err = ((x0_hat - x0) ** 2).flatten(1).mean(1)
        snr = 1 / sigma**2
        w = d.natural_weight(snr).float()
        assert torch.allclose(d.loss(x0, noise, sigma), w * err, rtol=1e-4), cls.__name__


def test_min_snr_weighting_per_sample_batch_gt_1():
    torch.manual_seed(0)
    sched = DiscreteSchedule.from_config(DiscreteScheduleConfig())
    net = TinyNet()
    x0, noise = _data(b=5)
    t = torch.tensor([0, 100, 400, 800, 999])
    sigma = sched.sigma(t)
    snr = (sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])).float()
    d = VPrediction(net, sched)
    plain = d.loss(x0, noise, sigma)
    weighted = d.loss(x0, noise, sigma, weighting="min_snr", min_snr_gamma=5.0)
    # diffusers' train_text_to_image: v-prediction weight min(snr, gamma) / (snr + 1)
    assert torch.allclose(weighted, plain * snr.clamp(max=5.0) / (snr + 1), rtol=1e-5)
    e = EpsPrediction(net, sched)
    assert torch.allclose(
        e.loss(x0, noise, sigma, weighting="min_snr"), e.loss(x0, noise, sigma) * snr.clamp(max=5.0) / snr, rtol=1e-5
    )
    with pytest.raises(ValueError, match="weighting"):
        d.loss(x0, noise, sigma, weighting="p2")


def test_zero_terminal_snr_training_is_finite():
    sched = DiscreteSchedule.from_config(COG)
    x0, noise = _data(b=2)
    sigma = sched.sigma(torch.tensor([999.0, 999.0]))
    assert torch.isinf(sigma).all()
    loss = VPrediction(TinyNet(), sched).loss(x0, noise, sigma)
    assert torch.isfinite(loss).all()


def test_loss_backpropagates():
    net = TinyNet()
    sched = DiscreteSchedule.from_config(COG)
    x0, noise = _data()
    VPrediction(net, sched).loss(x0, noise, sched.sigma(uniform_timesteps(4))).mean().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_vlb_term_matches_closed_form_gaussian_kl():
    torch.manual_seed(0)
    sched = DiscreteSchedule.from_config(DiscreteScheduleConfig(beta_end=0.02))
    net = TinyNet(out_mult=2)
    d = VPrediction(net, sched, learned_variance=True)
    x0, noise = _data(b=3)
    x0 = x0.clamp(-1, 1)
    t = torch.tensor([0, 10, 500])
    sigma = sched.sigma(t)
    total = d.loss(x0, noise, sigma)
    mse = VPrediction(lambda x, tt: net(x, tt)[:, :3], sched).loss(x0, noise, sigma)

    # independent computation of the posterior and the learned-range variance
    ac = sched.alphas_cumprod
    ab = ac[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = net(x_t, t.float())
    v, var = out[:, :3], out[:, 3:]
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])[t].float().view(-1, 1, 1, 1)
    beta = 1 - ab / ab_prev
    post_var = beta * (1 - ab_prev) / (1 - ab)
    betas_all = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_all = betas_all * (1 - torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])) / (1 - ac)
    min_log = torch.where(t == 0, post_all[1], post_all[t]).log().float().view(-1, 1, 1, 1)

    def mean(x0_):
        return (ab_prev.sqrt() * beta / (1 - ab)) * x0_ + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t

    frac = (var + 1) / 2
    model_log_var = frac * beta.log() + (1 - frac) * min_log
    p = torch.distributions.Normal(mean(x0_hat), (0.5 * model_log_var).exp())
    for i in (1, 2):  # t > 0: KL in bits
        q = torch.distributions.Normal(mean(x0)[i], post_var[i].sqrt().expand_as(x0[i]))
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(p.loc[i], p.scale[i])).mean() / math.log(2)
        assert torch.allclose(total[i] - mse[i], kl, rtol=1e-4)
    # t = 0: discretised Gaussian NLL with the exact normal CDF (IDDPM uses a tanh approximation)
    cdf = torch.distributions.Normal(p.loc[0], p.scale[0]).cdf
    lo = torch.where(x0[0] < -0.999, torch.zeros_like(x0[0]), cdf(x0[0] - 1 / 255))
    hi = torch.where(x0[0] > 0.999, torch.ones_like(x0[0]), cdf(x0[0] + 1 / 255))
    nll = -(hi - lo).clamp(min=1e-12).log().mean() / math.log(2)
    assert torch.allclose(total[0] - mse[0], nll, rtol=5e-3)


def test_vlb_term_trains_only_the_variance_channels():
    sched = DiscreteSchedule.from_config(DiscreteScheduleConfig(beta_end=0.02))
    x0, noise = _data(b=2)
    out = torch.zeros(2, 6, 6, 6, requires_grad=True)
    d = VPrediction(lambda x, t: out, sched, learned_variance=True)
    total = d.loss(x0, noise, sched.sigma(torch.tensor([5.0, 400.0])))
    mse_grad = torch.autograd.grad(VPrediction(lambda x, t: out[:, :3], sched).loss(x0, noise, sched.sigma(torch.tensor([5.0, 400.0]))).sum(), out)[0]
    grad = torch.autograd.grad(total.sum(), out)[0]
    assert torch.allclose(grad[:, :3], mse_grad[:, :3])  # the VLB adds nothing to the mean channels
    assert grad[:, 3:].abs().sum() > 0


def test_flow_loss_and_denoiser_agree():
    torch.manual_seed(0)
    x0, noise = _data()
    sigma = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    for velocity in ("noise_minus_x0", "x0_minus_noise"):
        d = FlowPrediction(TinyNet(), FlowSchedule(), velocity=velocity)
        s = sigma.view(-1, 1, 1, 1).float()
        x = (1 - s) * x0 + s * noise
        err = ((d(x, sigma) - x0) ** 2).flatten(1).mean(1)
        assert torch.allclose(d.loss(x0, noise, sigma), err / s.flatten() ** 2, rtol=1e-4)
    assert FlowPrediction(TinyNet()).noise_form is FLOW and VPrediction(TinyNet(), None).noise_form is VE


# ----------------------------------------------------------------------------------------------
# timestep samplers


@pytest.mark.parametrize("world_size,batch", [(1, 1), (1, 4), (2, 1), (3, 2), (8, 3), (7, 1)])
def test_stratified_bands_cover_range_exactly_once(world_size, batch):
    T = 1000
    bands = stratified_bands(T, world_size * batch)
    covered = torch.zeros(T, dtype=torch.long)
    for lo, hi in bands:
        covered[lo:hi] += 1
    assert torch.all(covered == 1)
    g = torch.Generator().manual_seed(0)
    for rank in range(world_size):
        own = bands[rank * batch : (rank + 1) * batch]
        draws = torch.stack([stratified_timesteps(batch, T, rank, world_size, g) for _ in range(300)])
        for j, (lo, hi) in enumerate(own):
            assert draws[:, j].min() >= lo and draws[:, j].max() < hi
            if hi - lo > 2:
                assert draws[:, j].min() <= lo + (hi - lo) // 4 and draws[:, j].max() >= hi - 1 - (hi - lo) // 4
        # each rank owns one contiguous stretch
        assert own[0][0] == bands[rank * batch][0] and own[-1][1] == bands[(rank + 1) * batch - 1][1]


def test_stratified_sampler_errors():
    with pytest.raises(ValueError, match="rank"):
        stratified_timesteps(1, 1000, rank=2, world_size=2)
    with pytest.raises(ValueError, match="bands"):
        stratified_timesteps(600, 1000, rank=0, world_size=2)


def test_logit_normal_sigmas():
    s = logit_normal_sigmas(20000, generator=torch.Generator().manual_seed(0))
    assert s.min() > 0 and s.max() < 1 and abs(float(s.median()) - 0.5) < 0.02
    shifted = logit_normal_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert abs(float(shifted.median()) - 0.75) < 0.02  # 3 * 0.5 / (1 + 2 * 0.5)


# ----------------------------------------------------------------------------------------------
# guidance


def _cond_model():
    calls = []

    def model(x, sigma, context):
        calls.append(x.shape[0])
        return x * 0.5 + context.mean(1).view(-1, 1, 1, 1) * torch.ones_like(x)

    return model, calls


def test_cfg_batched_equals_two_passes_and_formula():
    x = torch.randn(2, 3, 4, 4)
    sigma = torch.full((2,), 3.0, dtype=torch.float64)
    cond, uncond = {"context": torch.ones(2, 5)}, {"context": torch.zeros(2, 5)}
    model, calls = _cond_model()
    a = CFGDenoiser(model, 6.0, batched=True)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [4]
    b = CFGDenoiser(model, 6.0, batched=False)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [4, 2, 2]
    ref = model(x, sigma, **uncond) + 6.0 * (model(x, sigma, **cond) - model(x, sigma, **uncond))
    assert torch.allclose(a, b) and torch.allclose(a, ref)
    calls.clear()
    CFGDenoiser(model, 1.0)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [2]  # scale 1 skips the unconditional pass


def test_cfg_falls_back_to_two_passes_on_out_of_memory():
    x = torch.randn(1, 3, 4, 4)
    sigma = torch.ones(1, dtype=torch.float64)

    def model(x, sigma, context):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x + context.mean()

    d = CFGDenoiser(model, 2.0)
    out = d(x, sigma, cond={"context": torch.ones(1, 2)}, uncond={"context": torch.zeros(1, 2)})
    assert torch.allclose(out, x + 2.0) and d.batched is False


def test_cfg_with_different_text_lengths_runs_two_passes():
    model, calls = _cond_model()
    x = torch.randn(1, 3, 4, 4)
    CFGDenoiser(model, 3.0)(x, torch.ones(1), cond={"context": torch.ones(1, 7)}, uncond={"context": torch.zeros(1, 2)})
    assert calls == [1, 1]


def test_dynamic_cfg_matches_cogvideox_formula_and_forwards_noise_form():
    sched = DiscreteSchedule.from_config(COG)
    fn = cogvideox_dynamic_cfg(6.0, 50, sched.timestep)
    for t in (999, 979, 500, 19):
        ref = 1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t) / 50) ** 5.0)) / 2)
        assert fn(sched.sigma(torch.tensor([float(t)]))) == pytest.approx(ref)
    flow = CFGDenoiser(FlowPrediction(TinyNet()), 2.0)
    assert flow.noise_form is FLOW
    # and the wrapper samples: CFG over an x0 denoiser inside a sampler
    out = sample_euler(
        CFGDenoiser(_cond_model()[0], 2.0),
        torch.randn(1, 3, 4, 4) * 10,
        torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64),
        extra_args={"cond": {"context": torch.ones(1, 2)}, "uncond": {"context": torch.zeros(1, 2)}},
        disable=True,
    )
    assert torch.isfinite(out).all()
