"""Prediction types: wrappers that turn a bare network into a denoiser, and own its loss.

A bare network is called ``net(x_in, timestep, **cond)``; it never sees sigma. A wrapper is
called ``denoiser(x, sigma, **cond) -> x0_hat`` (the sampler contract of
:mod:`vdit_core.sampling`) and trains with ``denoiser.loss(x0, noise, sigma, **cond)``, so that
sampling and training share one definition of the noise process.

* :class:`EpsPrediction`, :class:`VPrediction`, :class:`X0Prediction`: discrete DDPM models
  (variance preserving). The network input is ``x / sqrt(1 + sigma^2)`` (the VP sample) and its
  timestep is ``schedule.timestep(sigma)``.
* :class:`FlowPrediction`: rectified flow; the network sees ``x`` and ``t = 1000 * sigma``.

Loss weightings are stated in x0 space, ``w(sigma) * |x0_hat - x0|^2``, and applied as a ratio
to each type's natural target MSE: ``"v"`` is CogVideoX's ``1/(1 - alpha_bar)`` (equal to
v-MSE), ``"min_snr"`` is min(SNR, gamma) (Hang et al. 2023).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .schedules import FLOW, VE, DiscreteSchedule, FlowSchedule

Weighting = Literal["v", "min_snr"] | None


def _as_sigma(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    dtype = torch.float32 if device.type == "mps" else torch.float64
    s = torch.as_tensor(sigma, dtype=dtype, device=device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [{batch}], got {tuple(s.shape)}")
    return s


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficients -> [B, 1, ...] in the dtype of ``like``."""
    return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _timestep_dtype(x: torch.Tensor) -> torch.dtype:
    """Networks get float32 timesteps, float64 when they run in float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).flatten(1).mean(1)


class DiscreteDenoiser:
    """Base of the discrete (VP) prediction types.

    Args:
        net: ``net(x_in, timestep, **cond)``; ``timestep`` is a float32 [B] tensor (float64
            when the input is float64).
        schedule: the model's DDPM schedule.
        learned_variance: the network outputs 2C channels, the last C being the learned-range
            variance (HunyuanDiT, IDDPM); sampling uses the first C, the loss adds the VLB term.
    """

    noise_form = VE
    prediction: str = ""

    def __init__(self, net, schedule: DiscreteSchedule, learned_variance: bool = False):
        self.net = net
        self.schedule = schedule
        self.learned_variance = learned_variance

    # network call -------------------------------------------------------------------------
    def _net(self, x_in: torch.Tensor, sigma: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.schedule.timestep(sigma).to(device=x_in.device, dtype=_timestep_dtype(x_in))
        out = self.net(x_in, t, **cond)
        if self.learned_variance:
            c = x_in.shape[1]
            if out.shape[1] != 2 * c:
                raise ValueError(f"learned_variance needs {2 * c} output channels, the network gave {out.shape[1]}")
            return out[:, :c], out[:, c:]
        return out, None

    @staticmethod
    def _vp(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of each sigma, exact at sigma = inf."""
        inf = torch.isinf(sigma)
        s = torch.where(inf, torch.zeros_like(sigma), sigma)
        norm = (1 + s * s).sqrt()
        a = torch.where(inf, torch.zeros_like(sigma), 1 / norm)
        b = torch.where(inf, torch.ones_like(sigma), s / norm)
        return a, b

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        """x0_hat from a VE sample ``x`` (at sigma = inf, ``x`` holds the unit noise)."""
        sigma = _as_sigma(sigma, x.shape[0], x.device)
        inf = torch.isinf(sigma)
        a, _ = self._vp(sigma)
        c_in = torch.where(inf, torch.ones_like(a), a)  # VP input; x / sigma at infinity
        out, _ = self._net(x * _bcast(c_in, x), sigma, cond)
        return self.to_x0(x, out, sigma)

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The start of a full denoise at ``sigma``: the unit noise taken as the VP sample there
        (as the reference DDPM pipelines start), i.e. ``noise * sqrt(1 + sigma^2)`` in VE
        coordinates; at an infinite sigma the noise itself (the ``x / sigma`` convention)."""
        s = float(sigma)
        return noise.clone() if math.isinf(s) else noise * math.sqrt(1 + s * s)

    def to_x0(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        raise NotImplementedError

    def natural_weight(self, snr: torch.Tensor) -> torch.Tensor:
        """x0-space weight equal to this type's target MSE."""
        raise NotImplementedError

    # loss ---------------------------------------------------------------------------------
    def loss(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor | float,
        weighting: Weighting = None,
        min_snr_gamma: float = 5.0,
        **cond,
    ) -> torch.Tensor:
        """Per-sample loss [B] at noise levels ``sigma`` [B].

        The network sees the VP sample ``sqrt(ab) x0 + sqrt(1-ab) noise`` (finite at zero terminal
        SNR) and is scored against :meth:`target`; with ``learned_variance`` the VLB term on the
        variance channels is added (Nichol & Dhariwal 2021; the mean is held fixed in it).
        """
        sigma = _as_sigma(sigma, x0.shape[0], x0.device)
        a, b = self._vp(sigma)
        x_in = x0 * _bcast(a, x0) + noise * _bcast(b, x0)
        out, var_out = self._net(x_in, sigma, cond)
        loss = _mean_per_sample(out - self.target(x0, noise, sigma))
        loss = loss * loss_weight(weighting, sigma, self.natural_weight, min_snr_gamma).to(loss.dtype)
        if self.learned_variance:
            x0_hat = self._x0_from_vp(x_in, out.detach(), a, b)
            loss = loss + self._vlb(x0, x_in, x0_hat, var_out, sigma)
        return loss

    def _x0_from_vp(self, x_in, out, a, b) -> torch.Tensor:
        raise NotImplementedError

    def _vlb(self, x0, x_t, x0_hat, var_out, sigma) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits, decoder NLL at t = 0 (IDDPM)."""
        sched = self.schedule
        t = sched.timestep(sigma).round().long().cpu()
        ac = sched.alphas_cumprod
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1 - ac / ac_prev
        post_var = betas * (1 - ac_prev) / (1 - ac)
        post_log_var = torch.cat([post_var[1:2], post_var[1:]]).log()  # clipped at t = 0
        coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

        def pick(v):
            return _bcast(v[t].to(x0.device), x0).float()

        x0f, xtf = x0.float(), x_t.float()
        true_mean = pick(coef_x0) * x0f + pick(coef_xt) * xtf
        model_mean = pick(coef_x0) * x0_hat.float() + pick(coef_xt) * xtf
        frac = (var_out.float() + 1) / 2
        model_log_var = frac * pick(betas.log()) + (1 - frac) * pick(post_log_var)
        true_log_var = pick(post_log_var)
        kl = 0.5 * (
            -1.0 + model_log_var - true_log_var + (true_log_var - model_log_var).exp()
            + (true_mean - model_mean) ** 2 * (-model_log_var).exp()
        )
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_log_var)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t.to(x0.device) == 0, nll, kl)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation IDDPM/ADM use, kept so losses match models trained with it
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (IDDPM)."""
    centered = x - means
    inv_stdv = (-log_scales).exp()
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, (cdf_plus - cdf_min).clamp(min=1e-12).log()),
    )
    return log_probs


def loss_weight(weighting: Weighting, sigma: torch.Tensor, natural_weight, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample factor turning a type's natural target MSE into the requested x0-space weighting.

    ``sigma`` is the VE(-equivalent) noise level, SNR = 1 / sigma^2.
    """
    if weighting is None:
        return torch.ones_like(sigma)
    snr = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), 1 / sigma.clamp(min=1e-20) ** 2)
    nat = natural_weight(snr)
    if weighting == "v":
        want = snr + 1
    elif weighting == "min_snr":
        want = snr.clamp(max=gamma)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected None, 'v' or 'min_snr'")
    # where both weights vanish (SNR 0 for eps) the limit of the ratio is 1
    return torch.where(nat > 0, want / nat.clamp(min=1e-30), torch.ones_like(nat))


class EpsPrediction(DiscreteDenoiser):
    """The network predicts the noise: x0 = x - sigma * eps_hat."""

    prediction = "eps"

    def to_x0(self, x, out, sigma):
        if torch.isinf(sigma).any():
            raise ValueError(
                "an eps-prediction model cannot denoise at infinite sigma (zero terminal SNR): "
                "use a schedule without the zero-SNR rescale, or a v/x0 model"
            )
        return x - out * _bcast(sigma, x)

    def _x0_from_vp(self, x_in, out, a, b):
        return (x_in - out * _bcast(b, x_in)) / _bcast(a.clamp(min=1e-12), x_in)

    def target(self, x0, noise, sigma):
        return noise

    def natural_weight(self, snr):
        return snr


class VPrediction(DiscreteDenoiser):
    """The network predicts v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022; CogVideoX)."""

    prediction = "v"

    def to_x0(self, x, out, sigma):
        inf = torch.isinf(sigma)
        s = torch.where(inf, torch.zeros_like(sigma), sigma)
        c_skip = torch.where(inf, torch.zeros_like(sigma), 1 / (1 + s * s))
        c_out = torch.where(inf, -torch.ones_like(sigma), -s / (1 + s * s).sqrt())
        return x * _bcast(c_skip, x) + out * _bcast(c_out, x)

    def _x0_from_vp(self, x_in, out, a, b):
        return x_in * _bcast(a, x_in) - out * _bcast(b, x_in)

    def target(self, x0, noise, sigma):
        a, b = self._vp(sigma)
        return noise * _bcast(a, noise) - x0 * _bcast(b, x0)

    def natural_weight(self, snr):
        return snr + 1


class X0Prediction(DiscreteDenoiser):
    """The network predicts x0 directly."""

    prediction = "x0"

    def to_x0(self, x, out, sigma):
        return out

    def _x0_from_vp(self, x_in, out, a, b):
        return out

    def target(self, x0, noise, sigma):
        return x0

    def natural_weight(self, snr):
        return torch.ones_like(snr)


PREDICTIONS: dict[str, type[DiscreteDenoiser]] = {
    "eps": EpsPrediction,
    "epsilon": EpsPrediction,
    "v": VPrediction,
    "v_prediction": VPrediction,
    "x0": X0Prediction,
    "sample": X0Prediction,
}


class FlowPrediction:
    """Rectified flow: ``x = (1 - sigma) x0 + sigma eps`` and the network predicts a velocity.

    Args:
        net: ``net(x, t, **cond)`` with ``t = sigma * schedule.num_timesteps``.
        velocity: ``"noise_minus_x0"`` (SD3, diffusers: v = eps - x0, x0 = x - sigma v) or
            ``"x0_minus_noise"`` (Open-Sora 1.2: v = x0 - eps, x0 = x + sigma v).
        learned_sigma_channels: the network outputs 2C channels of which the first C are the
            velocity (Open-Sora's ``pred_sigma``); the rest are ignored.
    """

    noise_form = FLOW
    prediction = "flow"

    def __init__(
        self,
        net,
        schedule: FlowSchedule | None = None,
        velocity: Literal["noise_minus_x0", "x0_minus_noise"] = "noise_minus_x0",
        learned_sigma_channels: bool = False,
    ):
        if velocity not in ("noise_minus_x0", "x0_minus_noise"):
            raise ValueError(f"velocity must be 'noise_minus_x0' or 'x0_minus_noise', got {velocity!r}")
        self.net = net
        self.schedule = schedule or FlowSchedule()
        self.sign = -1.0 if velocity == "noise_minus_x0" else 1.0
        self.learned_sigma_channels = learned_sigma_channels

    def _net(self, x, sigma, cond):
        t = self.schedule.timestep(sigma).to(device=x.device, dtype=_timestep_dtype(x))
        out = self.net(x, t, **cond)
        return out[:, : x.shape[1]] if self.learned_sigma_channels else out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = _as_sigma(sigma, x.shape[0], x.device)
        v = self._net(x, sigma, cond)
        return x + self.sign * v * _bcast(sigma, x)

    def prior(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The start of a full denoise: ``noise * sigma`` (the noise itself at sigma = 1)."""
        return noise * float(sigma)

    def target(self, x0, noise, sigma):
        return (x0 - noise) if self.sign > 0 else (noise - x0)

    @staticmethod
    def natural_weight(snr):
        # |v_hat - v|^2 = |x0_hat - x0|^2 / sigma^2 and 1/sigma = sqrt(SNR) + 1 (VE-equivalent SNR)
        return (snr.sqrt() + 1) ** 2

    def loss(self, x0, noise, sigma, weighting: Weighting = None, min_snr_gamma: float = 5.0, **cond) -> torch.Tensor:
        """Per-sample velocity MSE [B]; ``weighting`` as for the discrete types (VE-equivalent SNR)."""
        sigma = _as_sigma(sigma, x0.shape[0], x0.device)
        s = _bcast(sigma, x0)
        x = x0 * (1 - s) + noise * s
        loss = _mean_per_sample(self._net(x, sigma, cond) - self.target(x0, noise, sigma))
        ve_sigma = torch.where(sigma < 1, sigma / (1 - sigma).clamp(min=1e-20), torch.full_like(sigma, math.inf))
        return loss * loss_weight(weighting, ve_sigma, self.natural_weight, min_snr_gamma).to(loss.dtype)
