"""Samplers in the k-diffusion shape, shared by every model family.

Contract
--------
* A denoiser is any callable ``model(x, sigma, **extra_args) -> x0_hat`` where ``sigma`` is a
  tensor of shape [B].
* A sampler is ``sample_NAME(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)``.
  The caller passes ``x = noise * sigmas[0]`` (use :func:`prior_sample`) and gets the final
  sample back. ``sigmas`` is a 1-D tensor ending in 0 (float64 is best: see below).
* How noise enters a sample is the model's ``noise_form`` attribute (:data:`VE` or :data:`FLOW`);
  a callable without one is variance-exploding. Every sampler is written for the general form
  ``x = alpha(sigma) * x0 + sigma * eps`` (VE: alpha = 1; flow: alpha = 1 - sigma), so no sampler
  checks what kind of model it drives. Deterministic first-order steps coincide with Euler on
  ``dx/dsigma = (x - x0_hat) / sigma`` in both forms; ancestral and SDE steps add their noise in
  the VE-equivalent coordinates ``x / alpha`` at noise level ``sigma / alpha``, which is what makes
  them correct for flow models too.
* A zero-terminal-SNR schedule starts at ``sigma = inf``. A VE state at infinite sigma is
  represented by ``x / sigma``, i.e. the unit noise itself (:func:`prior_sample` returns it). The
  first step then is the exact variance-preserving step of the reference schedulers (DDIM,
  CogVideoX's DPM-Solver): no clamp is involved.
* ``callback`` receives ``{"i", "x", "sigma", "sigma_next", "denoised"}`` after each model
  evaluation of a step; ``disable`` turns the tqdm bar off.

Scalar coefficients are computed in Python floats (float64) from ``sigmas``; the sigma tensors
handed to the model are float64 (float32 on MPS) so that sigma -> timestep is exact.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import trange

from .schedules import FLOW, VE, NoiseForm  # noqa: F401  (FLOW and VE re-exported: samplers and tests use them from here)

NoiseSampler = Callable[[float, float], torch.Tensor]
SEED_MAX = 2**64 - 1  # seeds are 64-bit (ComfyUI's seed widget range); larger or negative ones wrap


# ----------------------------------------------------------------------------------------------
# Noise forms (defined with the schedules: how noise enters a sample is a fact of the process)


def noise_form(model) -> NoiseForm:
    """The model's noise form; plain callables are variance-exploding."""
    return getattr(model, "noise_form", VE)


def prior_sample(noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The sampler's starting point ``noise * sigma`` (``noise`` itself for sigma = inf)."""
    s = float(sigma)
    return noise.clone() if math.isinf(s) else noise * s


# ----------------------------------------------------------------------------------------------
# Seeded noise


class SeededNoise:
    """Reproducible noise, independent of batch size: sample ``b`` draws from its own CPU
    generator seeded ``seed + b``, so sample 0 of a batch of 4 equals a batch of 1 with the
    same seed, on any device.

    Calling it returns the next draw shaped like the batch; it is both the initial noise and a
    sampler's ``noise_sampler(sigma, sigma_next)``.

    Args:
        seed: base seed (any integer; wrapped into 0..SEED_MAX, so seed + b never overflows).
        shape: full batch shape [B, ...].
        permute: draw each sample in the order ``[shape[1:][i] for i in permute]`` and permute
            back, so that a seed reproduces the noise of an implementation with another layout.
    """

    def __init__(
        self,
        seed: int,
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        permute: Sequence[int] | None = None,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.permute = tuple(permute) if permute is not None else None
        self.generators = [torch.Generator("cpu").manual_seed((int(seed) + b) % (SEED_MAX + 1)) for b in range(self.shape[0])]

    def __call__(self, sigma: float | None = None, sigma_next: float | None = None) -> torch.Tensor:
        """The next draw of the batch shape (initial noise, then one per sampler request)."""
        return self.draw(self.shape, self.permute)

    def draw(self, shape: Sequence[int], permute: Sequence[int] | None = None) -> torch.Tensor:
        """The next draw of another shape [B, ...] from the same per-sample streams."""
        if shape[0] != len(self.generators):
            raise ValueError(f"this noise source has {len(self.generators)} samples, asked for {shape[0]}")
        item = tuple(shape[1:])
        out = []
        for g in self.generators:
            if permute is None:
                n = torch.randn(item, generator=g, dtype=torch.float32)
            else:
                drawn = torch.randn([item[i] for i in permute], generator=g, dtype=torch.float32)
                n = drawn.permute([list(permute).index(i) for i in range(len(item))])
            out.append(n)
        return torch.stack(out).to(device=self.device, dtype=self.dtype)


def _default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


# ----------------------------------------------------------------------------------------------
# Step helpers (Python-float coefficients)


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: float, alpha: float) -> torch.Tensor:
    """The noise implied by ``x = alpha * x0 + sigma * eps`` (``x`` itself at sigma = inf)."""
    if math.isinf(sigma):
        return x
    return (x - alpha * denoised) / sigma


def _over_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x / sigma`` (the state itself at sigma = inf)."""
    return x if math.isinf(sigma) else x / sigma


def _ancestral(form: NoiseForm, sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the step to ``sigma_next`` into deterministic and fresh noise, in VE-equivalent
    coordinates. Returns (c, u): x_next = alpha_n*x0 + sigma_next*(c*eps_hat + u*noise).

    In VE this is DDIM with ``eta`` (eta = 1: the DDPM posterior) and k-diffusion's ancestral
    split ``sigma_up = eta * sqrt(sigma_n^2 (sigma^2 - sigma_n^2) / sigma^2)``.
    """
    if sigma_next <= 0 or eta <= 0:
        return 1.0, 0.0
    r = form.ve_sigma(sigma_next) / form.ve_sigma(sigma)  # 0 when sigma is infinite
    u = min(1.0, eta * math.sqrt(max(0.0, 1.0 - r * r)))
    return math.sqrt(1.0 - u * u), u


def _call(model, x, sigma, extra_args):
    return model(x, _sigma_batch(sigma, x), **extra_args)


def _evaluate(model, x, i, s, sn, extra_args, callback):
    """The x0 estimate of step ``i`` at sigma ``s``, reported to the callback."""
    denoised = _call(model, x, s, extra_args)
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": sn, "denoised": denoised})
    return denoised


# ----------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler on dx/dsigma = (x - x0_hat)/sigma (Karras et al. 2022, Alg. 2 without churn).

    Equals deterministic DDIM for discrete models and rectified-flow Euler (Open-Sora) for flow
    models. Written as ``x_next = alpha_n*x0_hat + sigma_next*eps_hat`` so that very large and
    infinite sigmas cause no cancellation.
    """
    extra_args = extra_args or {}
    form = noise_form(model)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        x = form.alpha(sn) * denoised + sn * _eps(x, denoised, s, form.alpha(s))
    return x


def _sample_ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler):
    extra_args = extra_args or {}
    form = noise_form(model)
    noise_sampler = noise_sampler or _default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        c, u = _ancestral(form, s, sn, eta)
        x_next = form.alpha(sn) * denoised + (sn * c) * _eps(x, denoised, s, form.alpha(s))
        if u > 0:
            x_next = x_next + (sn * u * s_noise) * noise_sampler(s, sn)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None
):
    """Ancestral Euler: step down to sigma_down, add fresh noise up to sigma_next."""
    return _sample_ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None):
    """DDIM (Song et al. 2020). ``eta = 0`` (default) is deterministic and equals diffusers'
    DDIMScheduler / CogVideoXDDIMScheduler on the same timesteps; ``eta > 0`` adds DDIM's noise."""
    return _sample_ancestral(model, x, sigmas, extra_args, callback, disable, eta, 1.0, noise_sampler)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Ancestral DDPM: samples the posterior q(x_next | x, x0_hat) with its fixed small variance
    (DDIM with eta = 1 is the same step)."""
    return _sample_ancestral(model, x, sigmas, extra_args, callback, disable, 1.0, 1.0, noise_sampler)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn).

    The last step (to sigma 0) is an Euler step, as usual; so is a step from an infinite sigma,
    where the trapezoid rule is undefined.
    """
    extra_args = extra_args or {}
    form = noise_form(model)
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        x_euler = form.alpha(sn) * denoised + sn * _eps(x, denoised, s, form.alpha(s))
        if sn == 0 or math.isinf(s):
            x = x_euler
            continue
        denoised_2 = _call(model, x_euler, sn, extra_args)
        d = (x - denoised) / s
        d_2 = (x_euler - denoised_2) / sn
        x = x + (sn - s) * (d + d_2) / 2
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, in the half-logSNR of the
    VE-equivalent noise level. Equals diffusers' DPMSolverMultistepScheduler (dpmsolver++,
    midpoint, order 2, final sigma 0)."""
    extra_args = extra_args or {}
    form = noise_form(model)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        if sn == 0:
            x = denoised
            continue
        r = form.ve_sigma(sn) / form.ve_sigma(s)
        h = -math.log(r) if r > 0 else math.inf
        d = denoised
        if old_denoised is not None and math.isfinite(h_last):
            k = 1 / (2 * (h_last / h))
            d = (1 + k) * denoised - k * old_denoised
        x = sn * _over_sigma(x, s) + form.alpha(sn) * (1 - r) * d
        old_denoised, h_last = denoised, h
    return x


def _sde_step(form, x, denoised, old_denoised, s, sn, h_last, eta, solver_type):
    """One DPM-Solver++(2M) SDE step without its noise term, in VE-equivalent coordinates.

    Returns (x_next without noise, h, scale of the fresh noise). ``eta = 1`` is the SDE of
    Lu et al.; ``eta = 0`` reduces to the deterministic DPM-Solver++(2M).
    """
    r = form.ve_sigma(sn) / form.ve_sigma(s)  # e^{-h}; 0 from an infinite sigma
    h = -math.log(r) if r > 0 else math.inf
    r_eta = r**eta
    decay = r * r_eta  # e^{-(1 + eta) h}
    x_next = (sn * r_eta) * _over_sigma(x, s) + form.alpha(sn) * (1 - decay) * denoised
    if old_denoised is not None and math.isfinite(h_last):
        rho = h_last / h
        if solver_type == "heun":
            eh = (1 + eta) * h
            coef = 1 - (1 - decay) / eh
        else:  # midpoint
            coef = 0.5 * (1 - decay)
        x_next = x_next + form.alpha(sn) * (coef / rho) * (denoised - old_denoised)
    return x_next, h, sn * math.sqrt(max(0.0, 1 - r_eta * r_eta))


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE. Equals diffusers' DPMSolverMultistepScheduler with
    ``algorithm_type="sde-dpmsolver++"`` (midpoint) for the same noise."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    form = noise_form(model)
    noise_sampler = noise_sampler or _default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        if sn == 0:
            x = denoised
            continue
        x, h, noise_scale = _sde_step(form, x, denoised, old_denoised, s, sn, h_last, eta, solver_type)
        if noise_scale > 0:
            x = x + (noise_scale * s_noise) * noise_sampler(s, sn)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_cogvideox_dpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """CogVideoX's stochastic DPM-Solver++(2M) (SAT ``VPSDEDPMPP2MSampler``; diffusers
    ``CogVideoXDPMScheduler``): the 2M SDE with eta = 1 and the midpoint correction.

    The reference draws noise once on first-order steps (the first and the last) and twice on
    second-order steps, keeping the second; this sampler consumes its noise sampler the same
    way, so a seeded run reproduces the official sampler exactly.
    """
    extra_args = extra_args or {}
    form = noise_form(model)
    noise_sampler = noise_sampler or _default_noise_sampler(x)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)
        noise = noise_sampler(s, sn)
        second_order = old_denoised is not None and sn > 0
        if second_order:
            noise = noise_sampler(s, sn)
        if sn == 0:
            x = denoised
            continue
        x, h, noise_scale = _sde_step(
            form, x, denoised, old_denoised if second_order else None, s, sn, h_last, 1.0, "midpoint"
        )
        x = x + noise_scale * noise
        old_denoised, h_last = denoised, h
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int) -> tuple[list[list[float]], list[float], float]:
    """R (order x order), b (order) and B(h) of UniPC's bh2 variant for data prediction."""
    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{hh} - 1
    B_h = h_phi_1  # bh2: B(h) = e^{hh} - 1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rows, b, B_h


def _lambda(form: NoiseForm, sigma: float) -> float:
    """Half log-SNR of the VE-equivalent noise level (-inf at infinite sigma, inf at 0)."""
    s = form.ve_sigma(sigma)
    if s == 0:
        return math.inf
    return -math.log(s)


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2):
    """UniPC (Zhao et al. 2023): bh2 predictor-corrector, data prediction, lower order on the
    last step. Equals diffusers' UniPCMultistepScheduler with its defaults (order 2)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    extra_args = extra_args or {}
    form = noise_form(model)
    n = len(sigmas) - 1
    lambdas = [_lambda(form, float(s)) for s in sigmas]
    outputs: list[torch.Tensor] = []  # x0 predictions, newest last
    last_x, last_order, warm = None, 0, 0

    def history(newest: int, count: int, h: float):
        """(r_k, D1_k) for the ``count`` outputs before step ``newest``; entries at an infinite
        sigma (lambda = -inf) contribute nothing, which is the exact limit of the formulas."""
        rks, d1s = [], []
        for k in range(1, count):
            lam = lambdas[newest - k]
            if math.isinf(lam):
                break
            rk = (lam - lambdas[newest]) / h
            rks.append(rk)
            d1s.append((outputs[-(k + 1)] - outputs[-1]) / rk)
        return rks, d1s

    def update(x_base, i_from, i_to, m0, res):
        s, sn = float(sigmas[i_from]), float(sigmas[i_to])
        r = math.exp(-(lambdas[i_to] - lambdas[i_from]))
        return sn * _over_sigma(x_base, s) + form.alpha(sn) * ((1 - r) * m0 - res)

    for i in trange(n, disable=disable):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _evaluate(model, x, i, s, sn, extra_args, callback)

        if last_x is not None:  # UniC: correct x_i with the new evaluation
            h = lambdas[i] - lambdas[i - 1]
            rks, d1s = history(i - 1, last_order, h)
            rows, b, B_h = _unipc_coefficients(h, rks + [1.0], len(rks) + 1)
            if not rks:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
            res = rhos[-1] * (denoised - outputs[-1])
            for rho, d1 in zip(rhos[:-1], d1s):
                res = res + rho * d1
            x = update(last_x, i - 1, i, outputs[-1], B_h * res)

        outputs = (outputs + [denoised])[-order:]
        this_order = min(order, n - i, warm + 1)
        last_x, last_order = x, this_order
        if sn == 0:
            x = denoised
            break
        h = lambdas[i + 1] - lambdas[i]  # UniP: predict x_{i+1}
        rks, d1s = history(i, this_order, h)
        rows, b, B_h = _unipc_coefficients(h, rks + [1.0], len(rks) + 1)
        res = None
        if len(rks) == 1:
            rhos = [0.5]
        elif rks:
            k = len(rks)
            rhos = torch.linalg.solve(
                torch.tensor([row[:k] for row in rows[:k]], dtype=torch.float64), torch.tensor(b[:k], dtype=torch.float64)
            ).tolist()
        for rho, d1 in zip(rhos if rks else [], d1s):
            res = rho * d1 if res is None else res + rho * d1
        x = update(x, i, i + 1, denoised, 0 if res is None else B_h * res)
        warm = min(warm + 1, order)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "cogvideox_dpm": sample_cogvideox_dpm,
    "unipc": sample_unipc,
    # rectified-flow Euler (Open-Sora's sampler) is Euler in the flow form
    "flow_euler": sample_euler,
}

# Samplers that draw fresh noise and so take a ``noise_sampler``.
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "ddim", "ddpm", "dpmpp_2m_sde", "cogvideox_dpm"})
