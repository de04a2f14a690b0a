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

from .common import InversionInfo, euler_step, per_sample_rms, to_d

SIGMA_FLOOR = 1e-4  # ComfyUI's FlipSigmas uses the same value in place of a leading 0
TRENDS = ("constant", "linear_increase", "linear_decrease")


def _check_sigmas(sigmas, ascending, like):
    """Validate the schedule and return it as a tensor on like's device (its dtype if a list)."""
    sigmas = sigmas.to(like.device) if torch.is_tensor(sigmas) else torch.tensor(
        sigmas, dtype=like.dtype, device=like.device)
    s = [float(v) for v in sigmas]
    steps = list(zip(s[:-1], s[1:]))
    ok = all((b > a) if ascending else (b < a) for a, b in steps)
    if len(s) < 2 or not ok or min(s) < 0 or max(s) > 1:
        order = "strictly ascending" if ascending else "strictly descending"
        raise ValueError(f"sigmas must be {order} within [0, 1] with at least 2 entries, got {s}")
    return sigmas


def sample_generators(batch, seed):
    """One CPU generator per sample, seeded seed + b, so batched noise equals single runs."""
    return [torch.Generator().manual_seed(int(seed) + b) for b in range(batch)]


def randn_per_sample(like, generators):
    """Standard normal shaped like `like`, row b drawn from generators[b] (float32 on CPU, then cast)."""
    rows = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]
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


def _velocity(denoise, x, sigma, sigma_floor, s_in):
    """Model velocity u = (x - D)/sigma. At sigma = 0 D(x, 0) = x carries no velocity, so the
    model is evaluated at sigma_floor instead (as ComfyUI's FlipSigmas does); the step length
    stays the true sigma_next - sigma. Returns (u, denoised, sigma used for the model)."""
    sigma_eval = sigma.clamp_min(sigma_floor)
    denoised = denoise(x, sigma_eval * s_in)
    return to_d(x, denoised, sigma_eval), denoised, sigma_eval


def plain_ode_inversion(denoise, x0, sigmas, sigma_floor=SIGMA_FLOOR, callback=None):
    """Plain rectified-flow ODE inversion (forward Euler, image -> noise): the gamma = 0 baseline."""
    sigmas = _check_sigmas(sigmas, True, x0)
    info, x, s_in = InversionInfo(), x0, x0.new_ones([x0.shape[0]])
    for i in range(len(sigmas) - 1):
        u, denoised, sigma_eval = _velocity(denoise, x, sigmas[i], sigma_floor, s_in)
        info.model_calls += 1
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_eval, "denoised": denoised})
        x = x + u * (sigmas[i + 1] - sigmas[i])  # Euler method, sample_euler's arithmetic
    return x, info


def controlled_forward(denoise, y0, sigmas, gamma=0.5, seed=0, y1=None, sigma_floor=SIGMA_FLOOR,
                       callback=None):
    """Controlled forward ODE of RF-Inversion (Rout et al., ICLR 2025, Eq. 8), image -> noise.

    u_ctrl = u + gamma*((y1 - Y)/(1 - sigma) - u), Euler in sigma, written as
    Y + (1 - gamma)*u*dsigma + gamma*(dsigma/(1 - sigma))*(y1 - Y): dsigma/(1 - sigma) <= 1 on
    an ascending schedule in [0, 1] and is exactly 1 on a last step ending at sigma = 1, where
    the controller part lands on y1 (gamma = 1 returns y1). No step starts at sigma = 1.
    y1 ~ N(0, I) per sample from seed + b unless given. info.residuals: per step, per-sample RMS
    of the controller's displacement gamma*(ctrl - u)*dsigma.
    """
    sigmas = _check_sigmas(sigmas, True, y0)
    info, x, s_in = InversionInfo(), y0, y0.new_ones([y0.shape[0]])
    y1 = randn_per_sample(y0, sample_generators(y0.shape[0], seed)) if y1 is None else y1
    for i in range(len(sigmas) - 1):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        u, denoised, sigma_eval = _velocity(denoise, x, sigma, sigma_floor, s_in)
        info.model_calls += 1
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_eval, "denoised": denoised})
        pull = (dt / (1 - sigma)) * (y1 - x)                 # (y1 - Y)/(1 - sigma) * dsigma, finite
        control = gamma * (pull - u * dt)
        info.residuals.append(per_sample_rms(control).tolist())
        x = x + ((1 - gamma) * u * dt + gamma * pull)      # gamma = 0: x + u*dt exactly
    return x, info


def controlled_reverse(denoise, x1, sigmas, y0_reference, eta=0.9, start=0.0, stop=0.25,
                       trend="constant", callback=None):
    """Controlled reverse ODE of RF-Inversion (Rout et al., ICLR 2025, Eq. 15), noise -> image.

    v_ctrl = v + eta_i*((y0 - X)/sigma - v) in sigma coordinates, i.e. Euler with
    D' = (1 - eta_i)*D + eta_i*y0; eta_i from `eta_schedule` (start/stop are fractions of the
    steps). Where eta_i = 0 the step is ComfyUI's sample_euler step unchanged. Only divides by
    sigma > 0 (the last step ends at 0; none starts there). info.residuals: per step, per-sample
    RMS of D' - D.
    """
    sigmas = _check_sigmas(sigmas, False, x1)
    n_steps = len(sigmas) - 1
    etas = eta_schedule(eta, n_steps, start, stop, trend)
    info, x, s_in = InversionInfo(), x1, x1.new_ones([x1.shape[0]])
    for i in range(n_steps):
        denoised = denoise(x, sigmas[i] * s_in)
        info.model_calls += 1
        guided = denoised if etas[i] == 0 else (1 - etas[i]) * denoised + etas[i] * y0_reference
        info.residuals.append(per_sample_rms(guided - denoised).tolist())
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": guided})
        x = euler_step(x, guided, sigmas[i], sigmas[i + 1])
    return x, info


def controlled_forward_sde(denoise, y0, sigmas, gamma=0.5, seed=0, y1=None, callback=None):
    """Controlled forward SDE of RF-Inversion (Rout et al., ICLR 2025, Eq. 10), image -> noise.

    dY = (gamma*y1 - Y)/(1 - sigma) dsigma + sqrt(2*(1 - gamma)*sigma/(1 - sigma)) dW. This is
    drift u_ctrl + (g^2/2)*score with the model's score written through u; the model term
    cancels exactly, so `denoise` is never called (kept for a uniform signature). The SDE is
    linear with additive noise, so each step uses its exact Gaussian transition instead of
    Euler-Maruyama: Z = Y - gamma*y1 scales by (1 - s')/(1 - s) and gains variance
    (1 - gamma)*(s'^2 - ((1 - s')*s/(1 - s))^2). That is finite up to and at sigma = 1, where
    Y = gamma*y1 + sqrt(1 - gamma)*noise (Euler-Maruyama would double that variance on the last
    step). y1 and the per-step noise come from the generator seeded seed + b, y1 first.
    """
    sigmas = _check_sigmas(sigmas, True, y0)
    gens = sample_generators(y0.shape[0], seed)
    y1_drawn = randn_per_sample(y0, gens)
    y1 = y1_drawn if y1 is None else y1
    info, x = InversionInfo(), y0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": None})
        decay = (1 - s_next) / (1 - s)                               # s < 1 on every step
        std = math.sqrt(max((1 - gamma) * (s_next ** 2 - (decay * s) ** 2), 0.0))
        x = gamma * y1 + decay * (x - gamma * y1) + std * randn_per_sample(x, gens)
        info.residuals.append([std] * x.shape[0])
    return x, info


def controlled_reverse_sde(denoise, x1, sigmas, y0_reference, eta=0.9, start=0.0, stop=0.25,
                           trend="constant", seed=0, callback=None):
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
    sigmas = _check_sigmas(sigmas, False, x1)
    n_steps = len(sigmas) - 1
    etas = eta_schedule(eta, n_steps, start, stop, trend)
    gens = sample_generators(x1.shape[0], seed)
    info, x, s_in = InversionInfo(), x1, x1.new_ones([x1.shape[0]])
    for i in range(n_steps):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        denoised = denoise(x, sigma * s_in)
        info.model_calls += 1
        guided = denoised if etas[i] == 0 else (1 - etas[i]) * denoised + etas[i] * y0_reference
        info.residuals.append(per_sample_rms(guided - denoised).tolist())
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": guided})
        if float(sigma) >= 1 or float(sigmas[i + 1]) <= 0:
            x = euler_step(x, guided, sigma, sigmas[i + 1])  # ODE step at both ends (see docstring)
            continue
        u_ctrl = to_d(x, guided, sigma)
        drift = 2 * u_ctrl + x / (1 - sigma)
        diffusion = torch.sqrt(2 * sigma / (1 - sigma) * (-dt))
        x = x + drift * dt + diffusion * randn_per_sample(x, gens)
    return x, info
