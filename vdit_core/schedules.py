"""Noise schedules in the k-diffusion convention.

Everything here speaks of ``sigma``:

* For discrete DDPM (variance-preserving) models, sigma is the variance-exploding noise level,
  ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, so a noisy sample is ``x = x0 + sigma * eps``.
  A zero-terminal-SNR schedule has ``alpha_bar = 0`` at its last timestep, i.e. ``sigma = inf``
  there. That value is kept exactly (no clamp): the samplers treat a state at ``sigma = inf`` as
  ``x / sigma``, the unit noise itself (see :mod:`vdit_core.sampling`), which reproduces the exact
  variance-preserving computation of the reference schedulers.
* For rectified-flow models, sigma is the interpolation weight in ``[0, 1]``:
  ``x = (1 - sigma) * x0 + sigma * eps``.

Schedules are plain objects with the same small interface, ``sigma(t)``, ``timestep(sigma)``,
``sigma_min``, ``sigma_max`` and ``get_sigmas(n, spacing=None, shift=None)``; sigma lists
always end in 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

# ComfyUI keeps zero-terminal-SNR schedules finite: its last alpha_bar is this (sigma ~ 4519). A
# sigma at or beyond it is read as the terminal timestep, so both ends meet on the same network input.
TERMINAL_ALPHA_BAR = 4.8973451890853435e-08

Spacing = Literal["trailing", "leading", "linspace", "linspace_round", "karras", "exponential"]
SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "linspace_round", "karras", "exponential")


# ----------------------------------------------------------------------------------------------
# Noise forms

class NoiseForm:
    """How a noisy sample is formed: ``x = alpha(sigma) * x0 + sigma * eps``."""

    def __init__(self, name: str, alpha: Callable[[float], float]):
        self.name = name
        self._alpha = alpha

    def __repr__(self) -> str:
        return f"NoiseForm({self.name!r})"

    def alpha(self, sigma: float) -> float:
        return self._alpha(float(sigma))

    def ve_sigma(self, sigma: float) -> float:
        """The noise level in the VE-equivalent coordinates ``x / alpha``."""
        a = self.alpha(sigma)
        return math.inf if a <= 0 else float(sigma) / a

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Noise ``x0`` to level ``sigma`` (a float or a [B] tensor).

        At an infinite VE sigma this returns the unit noise (the ``x / sigma`` convention).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x0.shape[0])
        out = []
        for b in range(x0.shape[0]):
            s = float(sigma[b])
            if math.isinf(s):
                out.append(noise[b])
            else:
                out.append(x0[b] * self.alpha(s) + noise[b] * s)
        return torch.stack(out)


VE = NoiseForm("ve", lambda s: 1.0)
FLOW = NoiseForm("flow", lambda s: 1.0 - s)


# ----------------------------------------------------------------------------------------------
# Discrete DDPM schedules


@dataclass(frozen=True)
class DiscreteScheduleConfig:
    """How a discrete DDPM schedule is built (the fields of a diffusers ``scheduler_config.json``)."""

    num_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 1.0  # CogVideoX: alpha_bar / (s + (1 - s) alpha_bar); 1 = no shift
    zero_terminal_snr: bool = False  # Lin et al. 2023 rescale, alpha_bar[T-1] = 0
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "leading"
    steps_offset: int = 0  # added to "leading" timesteps, as diffusers does

    @classmethod
    def from_diffusers(cls, config: dict) -> "DiscreteScheduleConfig":
        """Read the fields of a diffusers scheduler config dict (unknown keys are ignored)."""
        beta_schedule = config.get("beta_schedule", "linear")
        names = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
        if beta_schedule not in names:
            raise ValueError(
                f"scheduler config: beta_schedule {beta_schedule!r} is not supported; "
                f"expected one of {sorted(names)}"
            )
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: explicit trained_betas are not supported")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"scheduler config: timestep_spacing {spacing!r} is not supported")
        return cls(
            num_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_schedule=names[beta_schedule],
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            # diffusers' CogVideoX schedulers default this to 3.0 when the key is absent
            snr_shift_scale=float(config.get("snr_shift_scale", 3.0 if "CogVideoX" in config.get("_class_name", "") else 1.0)),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
        )


def make_betas(config: DiscreteScheduleConfig) -> torch.Tensor:
    """Betas of a DDPM schedule, float64, shape [T]."""
    n = config.num_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    if config.beta_schedule == "cosine":
        # Nichol & Dhariwal's squared-cosine alpha_bar, betas capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}")


def shift_snr(alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """Divide the SNR by ``scale`` (CogVideoX's ``snr_shift_scale``): a -log(scale) logSNR shift."""
    return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 and the first is unchanged."""
    s = alphas_cumprod.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    return s**2


class DiscreteSchedule:
    """A discrete DDPM schedule of ``T`` steps, viewed through VE sigmas.

    Args:
        alphas_cumprod: alpha_bar for t = 0..T-1 (any float dtype; kept in float64).
        config: the config it was built from, when there is one (keeps the default spacing).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, config: DiscreteScheduleConfig | None = None):
        ac = alphas_cumprod.to(torch.float64).cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        if not torch.all(ac[1:] <= ac[:-1]) or ac[0] > 1 or ac[-1] < 0:
            raise ValueError("alphas_cumprod must be non-increasing within [0, 1]")
        if torch.any(ac[:-1] <= 0):
            raise ValueError("only the last alpha_bar may be 0 (zero terminal SNR)")
        self.config = config
        self.alphas_cumprod = ac
        self.num_timesteps = ac.numel()
        with torch.no_grad():
            sigmas = ((1 - ac) / ac).sqrt()  # inf where alpha_bar = 0
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.sqrt_alphas_cumprod = ac.sqrt()

    @classmethod
    def from_config(cls, config: DiscreteScheduleConfig) -> "DiscreteSchedule":
        ac = torch.cumprod(1 - make_betas(config), dim=0)
        if config.snr_shift_scale != 1.0:
            ac = shift_snr(ac, config.snr_shift_scale)
        if config.zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
        return cls(ac, config)

    # -- properties --------------------------------------------------------------------------
    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest sigma (``inf`` for a zero-terminal-SNR schedule)."""
        return float(self.sigmas[-1])

    @property
    def sigma_max_finite(self) -> float:
        """The largest finite sigma (what Karras/exponential spacings start from)."""
        return float(self.sigmas[-2] if self.zero_terminal_snr else self.sigmas[-1])

    @property
    def betas(self) -> torch.Tensor:
        prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1 - self.alphas_cumprod / prev

    # -- sigma <-> timestep ------------------------------------------------------------------
    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, interpolating log sigma between integers.

        In the last interval of a zero-terminal-SNR schedule log sigma is infinite, so there
        sqrt(alpha_bar) is interpolated instead (it is finite and reaches 0 at T-1).
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        tc = t.cpu().clamp(0, self.num_timesteps - 1)
        lo = tc.floor().long().clamp(max=self.num_timesteps - 2)
        w = tc - lo
        if self.zero_terminal_snr:
            last = lo == self.num_timesteps - 2
        else:
            last = torch.zeros_like(lo, dtype=torch.bool)
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[(lo + 1)].where(~last, self.log_sigmas[lo])
        # integer timesteps give the table values exactly (exp(log(s)) may be 1 ulp off)
        out = torch.where(w == 0, self.sigmas[lo], log_s.exp())
        out = torch.where(w == 1, self.sigmas[lo + 1], out)
        if last.any():
            sa = (1 - w) * self.sqrt_alphas_cumprod[lo]  # sqrt(alpha_bar) at T-1 is 0
            out = torch.where(last & (w < 1), ((1 - sa**2) / sa**2).sqrt(), out)
        return out.to(t.device)

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of a sigma: the exact inverse of :meth:`sigma`. ``inf`` -> T-1."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        s = sigma.cpu()
        T = self.num_timesteps
        finite_logs = self.log_sigmas[:-1] if self.zero_terminal_snr else self.log_sigmas
        log_s = s.clamp(min=float(self.sigmas[0])).log()
        # index of the interval [lo, lo+1] holding log_s within the finite part of the table
        lo = torch.searchsorted(finite_logs, log_s.clamp(max=float(finite_logs[-1])).contiguous(), right=True) - 1
        lo = lo.clamp(0, finite_logs.numel() - 2)
        l0, l1 = finite_logs[lo], finite_logs[lo + 1]
        t = lo.to(torch.float64) + ((log_s - l0) / (l1 - l0)).clamp(0, 1)
        if self.zero_terminal_snr:
            # beyond the last finite sigma: interpolate sqrt(alpha_bar) towards 0 at T-1 (ComfyUI's
            # finite stand-in for the end, TERMINAL_ALPHA_BAR, and beyond: T-1)
            beyond = s > float(finite_logs[-1].exp())
            sa_last = self.sqrt_alphas_cumprod[T - 2]
            sa = (1 / (1 + s**2)).sqrt()
            t_beyond = torch.where(sa <= TERMINAL_ALPHA_BAR**0.5 * (1 + 1e-6), torch.full_like(sa, T - 1.0), (T - 2) + (1 - sa / sa_last))
            t = torch.where(beyond, t_beyond, t)
        return t.to(sigma.device)

    # -- sampling schedules ------------------------------------------------------------------
    def timesteps(self, n: int, spacing: str | None = None, steps_offset: int | None = None) -> torch.Tensor:
        """Descending timesteps of an ``n``-step sampling run, as diffusers spaces them.

        ``trailing``: round(arange(T, 0, -T/n)) - 1 (starts at T-1; CogVideoX).
        ``leading``: arange(n) * (T // n), reversed, plus ``steps_offset``.
        ``linspace``: linspace(0, T-1, n), reversed (fractional, as diffusers' Euler schedulers).
        ``linspace_round``: round(linspace(0, T-1, n+1)), reversed, without t = 0 (diffusers'
        DPM-Solver with "linspace": 5 steps are 999, 799, 599, 400, 200).
        """
        spacing = spacing or (self.config.timestep_spacing if self.config else "leading")
        offset = steps_offset if steps_offset is not None else (self.config.steps_offset if self.config else 0)
        T = self.num_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {n}")
        if spacing == "trailing":
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        elif spacing == "leading":
            ts = (torch.arange(n, dtype=torch.float64) * (T // n)).round().flip(0) + offset
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
        elif spacing == "linspace_round":  # n+1 rounded points, t = 0 dropped (diffusers' DPM-Solver "linspace")
            ts = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected trailing, leading, linspace or linspace_round")
        return ts

    def get_sigmas(self, n: int, spacing: str | None = None, shift: float | None = None) -> torch.Tensor:
        """Sigmas (float64, length n+1, ending in 0) for an ``n``-step run.

        ``spacing`` is a timestep spacing (``trailing``/``leading``/``linspace``) or a sigma
        spacing (``karras``, ``exponential``) between the schedule's smallest and largest finite
        sigma. ``shift`` belongs to flow schedules: a discrete schedule takes none (or 1).
        """
        if shift is not None and shift != 1.0:
            raise ValueError(f"shift={shift}: a discrete DDPM schedule takes no shift (its SNR shift is part of the schedule)")
        spacing = spacing or (self.config.timestep_spacing if self.config else "leading")
        if spacing == "karras":
            return karras_sigmas(n, self.sigma_min, self.sigma_max_finite)
        if spacing == "exponential":
            return exponential_sigmas(n, self.sigma_min, self.sigma_max_finite)
        return torch.cat([self.sigma(self.timesteps(n, spacing)), torch.zeros(1, dtype=torch.float64)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) sigmas: n values from sigma_max to sigma_min, then 0."""
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"karras sigmas need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"exponential sigmas need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------
# Rectified flow


def time_shift(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3-style shift ``shift*s / (1 + (shift-1)*s)`` (Open-Sora's timestep transform is this map,
    computed by its family in float32 as the release)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: sigma = t / T in [0, 1]; the network sees ``t = sigma * T``."""

    num_timesteps: int = 1000
    shift: float = 1.0  # default shift of get_sigmas (1 = none)

    @property
    def sigma_min(self) -> float:
        return 0.0

    @property
    def sigma_max(self) -> float:
        return 1.0

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.num_timesteps

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64) * self.num_timesteps

    def get_sigmas(self, n: int, spacing: str | None = None, shift: float | None = None) -> torch.Tensor:
        """``n`` steps from 1 down to 0, evenly spaced (``spacing`` None or ``linspace``), then
        shifted by ``shift`` (default: the schedule's; Open-Sora's sampler schedule)."""
        if spacing not in (None, "linspace"):
            raise ValueError(f"spacing {spacing!r}: a flow schedule is spaced evenly (linspace) and then shifted")
        return flow_sigmas(n, self.shift if shift is None else shift)


def flow_sigmas(n: int, shift: float = 1.0) -> torch.Tensor:
    """linspace(1, 0, n+1) passed through :func:`time_shift`."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    return time_shift(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift)
