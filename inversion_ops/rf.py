"""RF-Inversion (Rout et al., ICLR 2025): the controlled rectified-flow ODE / SDE, in ComfyUI's flow sigma
(x = (1 - sigma)*x0 + sigma*noise, u = dx/dsigma = (x - D)/sigma). Noise comes per sample from CPU generators
seeded seed + b, so a batch gives the rows of single runs on any device.
"""
import math

import torch

from .common import SIGMA_FLOOR, CountedModel, check_sigmas, euler_step, per_sample_rms, report, to_d, work_dtype

TRENDS = ("constant", "linear_increase", "linear_decrease")
# the paper's (and diffusers') controller settings, read by the nodes: see docs/results.md#rf-defaults
GAMMA, ETA, START, STOP = 0.5, 0.9, 0.0, 0.25
EDIT_DEFAULTS = {"steps": 28, "gamma": GAMMA, "eta": ETA, "start": START, "stop": STOP}


def _prepare(sigmas, ascending, x, extra_args, model):
    """Checked schedule on x's device, the counted model, and x as a float32 (or float64) iterate."""
    sigmas = check_sigmas(sigmas, ascending, unit_interval=True).to(x.device)
    return sigmas, CountedModel(model, extra_args), x.to(work_dtype(x))


def sample_generators(batch, seed):
    """One CPU generator per sample, seeded seed + b, so batched noise equals single runs."""
    return [torch.Generator().manual_seed(int(seed) + b) for b in range(batch)]


def randn_per_sample(like, generators):
    """Standard normal shaped like `like`, row b from generators[b] (on the CPU: the same on every device)."""
    rows = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]  # cpu: seeded
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def eta_schedule(eta, n_steps, start=0.0, stop=0.25, trend="constant"):
    """Per-step controller strength: eta (shaped by `trend`) on steps round(start*N) <= i < round(stop*N), else 0."""
    if trend not in TRENDS:
        raise ValueError(f"trend must be one of {TRENDS}, got {trend!r}")
    first, last = round(start * n_steps), round(stop * n_steps)
    n = max(last - first, 0)
    etas = [0.0] * n_steps
    for k, i in enumerate(range(max(first, 0), min(last, n_steps))):
        ramp = {"constant": 1.0, "linear_increase": (k + 1) / n, "linear_decrease": (n - k) / n}[trend]
        etas[i] = float(eta) * ramp
    return etas


def _velocity(model, x, sigma, sigma_floor):
    """(u = (x - D)/sigma, D, sigma used): at sigma 0 D carries no velocity, so D is taken at sigma_floor."""
    sigma_eval = sigma.clamp_min(sigma_floor)
    denoised = model(x, sigma_eval).to(x.dtype)
    return to_d(x, sigma_eval, denoised), denoised, sigma_eval


@torch.no_grad()
def controlled_forward(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=GAMMA, seed=0,
                       y1=None, sigma_floor=SIGMA_FLOOR):
    """Controlled forward ODE (Rout et al. 2025, Eq. 8), image -> noise: Euler on u + gamma*((y1 - Y)/(1 - sigma) - u),
    y1 ~ N(0, I) from seed + b unless given; gamma = 0 is plain ODE inversion."""
    sigmas, model, x = _prepare(sigmas, True, x, extra_args, model)
    y1 = randn_per_sample(x, sample_generators(x.shape[0], seed)) if y1 is None else y1.to(x)
    for i in range(len(sigmas) - 1):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        u, denoised, sigma_eval = _velocity(model, x, sigma, sigma_floor)
        pull = (dt / (1 - sigma)) * (y1 - x)                 # (y1 - Y)/(1 - sigma) * dsigma, finite
        control = gamma * (pull - u * dt)
        report(callback, i=i, x=x, sigma=sigma, sigma_hat=sigma_eval, denoised=denoised,
               residual=per_sample_rms(control), model_calls=model.calls)
        x = x + ((1 - gamma) * u * dt + gamma * pull)      # gamma = 0: x + u*dt exactly
    return x


def _guided(denoised, reference, eta_i):
    """Euler's D replaced by (1 - eta_i)*D + eta_i*y0: the reverse controller in sigma coordinates."""
    return denoised if eta_i == 0 else (1 - eta_i) * denoised + eta_i * reference


@torch.no_grad()
def controlled_reverse(model, x, sigmas, extra_args=None, callback=None, disable=None, reference=None, eta=ETA,
                       start=START, stop=STOP, trend="constant"):
    """Controlled reverse ODE (Rout et al. 2025, Eq. 15), noise -> image: Euler with D' = (1 - eta_i)*D + eta_i*y0,
    y0 = `reference`, eta_i from `eta_schedule`."""
    sigmas, model, x = _prepare(sigmas, False, x, extra_args, model)
    reference = _reference(reference, x)
    etas = eta_schedule(eta, len(sigmas) - 1, start, stop, trend)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i]).to(x.dtype)
        guided = _guided(denoised, reference, etas[i])
        report(callback, i=i, x=x, sigma=sigmas[i], denoised=guided, residual=per_sample_rms(guided - denoised),
               model_calls=model.calls)
        x = euler_step(x, guided, sigmas[i], sigmas[i + 1])
    return x


def _reference(reference, x):
    if reference is None:
        raise ValueError("reference: the controlled reverse flow needs the source latent to pull toward")
    return reference.to(device=x.device, dtype=x.dtype).expand_as(x)


@torch.no_grad()
def controlled_forward_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=GAMMA, seed=0,
                           y1=None):
    """Controlled forward SDE (Rout et al. 2025, Eq. 10), image -> noise: dY = (gamma*y1 - Y)/(1 - sigma) dsigma
    + sqrt(2*(1 - gamma)*sigma/(1 - sigma)) dW; the model term cancels (never called), and each step takes
    the SDE's exact Gaussian transition, finite at sigma = 1 (see docs/results.md#rf-sde)."""
    sigmas, model, x = _prepare(sigmas, True, x, extra_args, model)
    gens = sample_generators(x.shape[0], seed)
    y1_drawn = randn_per_sample(x, gens)
    y1 = y1_drawn if y1 is None else y1.to(x)
    values = sigmas.detach().cpu().double().tolist()
    for i in range(len(values) - 1):
        s, s_next = values[i], values[i + 1]
        decay = (1 - s_next) / (1 - s)                               # s < 1 on every step
        std = math.sqrt(max((1 - gamma) * (s_next ** 2 - (decay * s) ** 2), 0.0))
        report(callback, i=i, x=x, sigma=sigmas[i], residual=x.new_full((x.shape[0],), std), model_calls=0)
        x = gamma * y1 + decay * (x - gamma * y1) + std * randn_per_sample(x, gens)
    return x


@torch.no_grad()
def controlled_reverse_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, reference=None, eta=ETA,
                           start=START, stop=STOP, trend="constant", seed=0):
    """Controlled reverse SDE (Rout et al. 2025, Eq. 16), noise -> image, Euler-Maruyama in sigma:
    X += (2*u_ctrl + X/(1 - sigma))*dsigma + sqrt(2*sigma/(1 - sigma)*|dsigma|)*noise, u_ctrl = (X - D')/sigma.
    Steps from sigma = 1 and to sigma = 0 are deterministic (one keeps the inverted noise, one returns D')."""
    sigmas, model, x = _prepare(sigmas, False, x, extra_args, model)
    reference = _reference(reference, x)
    values = sigmas.detach().cpu().double().tolist()
    etas = eta_schedule(eta, len(sigmas) - 1, start, stop, trend)
    gens = sample_generators(x.shape[0], seed)
    for i in range(len(sigmas) - 1):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        denoised = model(x, sigma).to(x.dtype)
        guided = _guided(denoised, reference, etas[i])
        report(callback, i=i, x=x, sigma=sigma, denoised=guided, residual=per_sample_rms(guided - denoised),
               model_calls=model.calls)
        if values[i] >= 1 or values[i + 1] <= 0:
            x = euler_step(x, guided, sigma, sigmas[i + 1])  # ODE step at both ends (see docstring)
            continue
        drift = 2 * to_d(x, sigma, guided) + x / (1 - sigma)
        diffusion = torch.sqrt(2 * sigma / (1 - sigma) * (-dt))
        x = x + drift * dt + diffusion * randn_per_sample(x, gens)
    return x
