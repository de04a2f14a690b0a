"""RF-Inversion (Rout et al., ICLR 2025): controlled rectified-flow ODE/SDE, forward and reverse.

One time convention throughout: ComfyUI's flow (CONST) sigma. x_sigma = (1 - sigma)*x0 + sigma*noise,
sigma = 0 is the image, sigma = 1 pure noise, and the sigma a latent is at is the sigma given to
the model and to the controller. The model velocity points toward noise:
u = dx/dsigma = (x - D(x, sigma)) / sigma.

- Forward (image -> structured noise), sigmas ascending, e.g. [0, ..., 1]: the paper's time t IS
  sigma, and its controller (y1 - Y)/(1 - t) pulls toward a seeded Gaussian y1.
- Reverse (noise -> image), sigmas descending, e.g. [1, ..., 0]: the paper runs its own time
  t' = 1 - sigma from noise to image, so its "(y0 - X)/(1 - t')" is (y0 - X)/sigma here. In
  sigma coordinates that controller is Euler with D replaced by (1 - eta)*D + eta*y0.

Noise is drawn per sample from CPU generators seeded `seed + b` (b = batch index), so a batch
gives the same rows as single runs with those seeds, on any device.
"""
import math

import torch

from .common import SIGMA_FLOOR, CountedModel, check_sigmas, euler_step, per_sample_rms, report, to_d, work_dtype

TRENDS = ("constant", "linear_increase", "linear_decrease")
# Defaults, read by the nodes: the paper's (and diffusers') controller settings, shared by the samplers
# and the one-node edit. On the tiny SD3-layout model trained on captions (bench/models.py, RF edit
# sweep, README "RF-Inversion"), these edit all 4 caption pairs (the classifier finds the target
# caption in every edit); the one-node edit's former (gamma 0.3, eta 1.0, stop 0.75), chosen on
# random-weight models, edited only 2 of the 4.
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
    """Standard normal shaped like `like`, row b drawn from generators[b] (float32 on CPU, then cast)."""
    # CPU generators give every device the same noise; the rows move to like's device below
    rows = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]  # cpu: seeded
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def eta_schedule(eta, n_steps, start=0.0, stop=0.25, trend="constant"):
    """Per-step controller strength: eta on steps round(start*N) <= i < round(stop*N), else 0.

    start and stop are fractions of the number of steps N; trend shapes eta inside that window
    (k = 0..n-1 over the n controlled steps): constant eta, linear_increase eta*(k+1)/n,
    linear_decrease eta*(n-k)/n.
    """
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
    """Model velocity u = (x - D)/sigma. At sigma = 0 D(x, 0) = x carries no velocity, so the
    model is evaluated at sigma_floor instead (as ComfyUI's FlipSigmas does); the step length
    stays the true sigma_next - sigma. Returns (u, denoised, sigma used for the model)."""
    sigma_eval = sigma.clamp_min(sigma_floor)
    denoised = model(x, sigma_eval).to(x.dtype)
    return to_d(x, sigma_eval, denoised), denoised, sigma_eval


@torch.no_grad()
def controlled_forward(model, x, sigmas, extra_args=None, callback=None, disable=None, gamma=GAMMA, seed=0,
                       y1=None, sigma_floor=SIGMA_FLOOR):
    """Controlled forward ODE of RF-Inversion (Rout et al., ICLR 2025, Eq. 8), image -> noise.

    u_ctrl = u + gamma*((y1 - Y)/(1 - sigma) - u), Euler in sigma, written as
    Y + (1 - gamma)*u*dsigma + gamma*(dsigma/(1 - sigma))*(y1 - Y): dsigma/(1 - sigma) <= 1 on
    an ascending schedule in [0, 1] and is exactly 1 on a last step ending at sigma = 1, where
    the controller part lands on y1 (gamma = 1 returns y1). No step starts at sigma = 1.
    gamma = 0 is plain ODE inversion (the baseline). y1 ~ N(0, I) per sample from seed + b unless
    given. `residual`: per-sample RMS of the controller's displacement gamma*(ctrl - u)*dsigma.
    """
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
    """Controlled reverse ODE of RF-Inversion (Rout et al., ICLR 2025, Eq. 15), noise -> image.

    v_ctrl = v + eta_i*((y0 - X)/sigma - v) in sigma coordinates, i.e. Euler with
    D' = (1 - eta_i)*D + eta_i*y0, y0 = `reference` (the source latent, in the sampler's space);
    eta_i from `eta_schedule`. Where eta_i = 0 the step is ComfyUI's sample_euler step unchanged.
    `residual`: per-sample RMS of D' - D.
    """
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
    """Controlled forward SDE of RF-Inversion (Rout et al., ICLR 2025, Eq. 10), image -> noise.

    dY = (gamma*y1 - Y)/(1 - sigma) dsigma + sqrt(2*(1 - gamma)*sigma/(1 - sigma)) dW. This is
    drift u_ctrl + (g^2/2)*score with the model's score written through u; the model term
    cancels exactly, so the model is never called (kept for a uniform signature). The SDE is
    linear with additive noise, so each step uses its exact Gaussian transition instead of
    Euler-Maruyama: Z = Y - gamma*y1 scales by (1 - s')/(1 - s) and gains variance
    (1 - gamma)*(s'^2 - ((1 - s')*s/(1 - s))^2). That is finite up to and at sigma = 1, where
    Y = gamma*y1 + sqrt(1 - gamma)*noise (Euler-Maruyama would double that variance on the last
    step). y1 and the per-step noise come from the generator seeded seed + b, y1 first.
    """
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
    """Controlled reverse SDE of RF-Inversion (Rout et al., ICLR 2025, Eq. 16), noise -> image.

    Euler-Maruyama in sigma (dsigma < 0): X += (2*u_ctrl + X/(1 - sigma))*dsigma
    + sqrt(2*sigma/(1 - sigma)*|dsigma|)*noise, u_ctrl = (X - D')/sigma with
    D' = (1 - eta_i)*D + eta_i*y0; in the paper's noise-to-image time that is drift
    2*v_ctrl - X/(1 - sigma). At sigma = 1 drift and diffusion both diverge and the exact
    transition forgets X (it would discard the inverted noise), so a step that starts at
    sigma = 1 is the deterministic controlled Euler step; noise enters from the next step on.
    The step that ends at sigma = 0 is deterministic too (it returns D', as ComfyUI's ancestral
    samplers add no noise there; Euler-Maruyama would leave noise of std ~ sqrt(3)*sigma).
    Fresh noise each step from the generator seeded seed + b.
    """
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
