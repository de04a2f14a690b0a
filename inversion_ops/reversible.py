"""Algebraically reversible two-state samplers and their exact inverses, one model call per step.

Each step of a two-state linear multistep sampler, y_{k+1} = a y_{k-1} + b y_k + c d(y_k, sigma_k) with
d = (y - D(y, sigma)) / sigma, can be solved for y_{k-1} given (y_k, y_{k+1}) with the same model call, so the
inverse needs no root finding: (y_{k-1}, y_k) = ((y_{k+1} - b y_k - c d_k) / a, y_k). The pair of the last
two states is the method's state; the first step (noise -> sigma_1) is euler unless the second state is given.

- O-BELM (Wang et al., NeurIPS 2024, "BELM: Bidirectional Explicit Linear Multi-step Sampler for Exact
  Inversion in Diffusion Models"): the second-order coefficients for the variable step.
- BDIA (Zhang, Lewis & Kleijn, ECCV 2024, "Exact Diffusion Inversion via Bi-directional Integration
  Approximation"): DDIM forward from sigma_k plus gamma times the correction that a DDIM step back to
  sigma_{k-1} misses; gamma = 0 is DDIM (not invertible), gamma = 1 the symmetric scheme.

Schedules: sample over descending sigmas, invert over ascending ones (as every inversion in this pack).
The inverse's result is the start y_0; the second state y_1 goes out through the callback's `previous`
(reported with the last step), and the sampler takes it back as `previous`.
"""
import torch

from .common import CountedModel, check_sigmas, euler_step, naive_step, report, to_d, work_dtype

VARIANT = "capped"   # chosen by measurement: see docs/results.md#reversible-choice
GAMMA = 1.0          # BDIA's mixing weight; its inverse divides by gamma
CAP = 1.0            # capped's ceiling on a: below 1 damps sampling, but the inverse then inflates a photo's
                     # start by 1/a per step (see docs/results.md#reversible-cap)


def o_belm_coefficients(sigma_prev, sigma, sigma_next, gamma=None):
    """(a, b, c) of O-BELM's step sigma -> sigma_next from states at sigma_prev (noisier) and sigma: exact for
    states quadratic in sigma (a + b = 1, and the first two moments)."""
    h, big_h = sigma_next - sigma, sigma_prev - sigma
    a = (h / big_h) ** 2
    return a, 1.0 - a, h * (big_h - h) / big_h


def bdia_coefficients(sigma_prev, sigma, sigma_next, gamma=GAMMA):
    """(a, b, c) of BDIA-DDIM: y_{k+1} = gamma (y_{k-1} - Delta(sigma -> sigma_prev)) + (1 - gamma) y_k
    + Delta(sigma -> sigma_next), Delta the DDIM (euler) increment from y_k."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1] (0 is DDIM, which is not invertible), got {gamma}")
    return gamma, 1.0 - gamma, (sigma_next - sigma) - gamma * (sigma_prev - sigma)


def capped_coefficients(sigma_prev, sigma, sigma_next, gamma=None, cap=CAP):
    """O-BELM where the steps shrink (its a < 1 damps the two states' alternating mode); where they grow its
    a > 1 would amplify that mode, so a is capped at `cap`, which is BDIA with gamma = cap there (see
    docs/results.md#reversible-choice)."""
    h, big_h = sigma_next - sigma, sigma_prev - sigma
    a = min(cap, (h / big_h) ** 2)
    return a, 1.0 - a, h - a * big_h


def ddim_leapfrog_coefficients(sigma_prev, sigma, sigma_next, gamma=None):
    """BDIA's symmetric step taken in the data-prediction variables (x / sigma against 1 / sigma, where every
    ComfyUI ODE reads d(x / sigma) / d(1 / sigma) = D): a DDIM step from sigma_prev to sigma_next with the
    denoised at sigma, y_{k+1} = r y_{k-1} + (1 - r) D_k, r = sigma_next / sigma_prev. There the dynamics
    expand towards the image, so the alternating mode decays while sampling; the step into sigma = 0 has
    r = 0 and is capped's (see docs/results.md#reversible-choice)."""
    if sigma_next <= 0.0:
        return capped_coefficients(sigma_prev, sigma, sigma_next)
    a = sigma_next / sigma_prev
    return a, 1.0 - a, -(1.0 - a) * sigma


VARIANTS = {"capped": capped_coefficients, "o_belm": o_belm_coefficients, "bdia": bdia_coefficients,
            "ddim_leapfrog": ddim_leapfrog_coefficients}


def _coefficients(variant):
    if callable(variant):   # a coefficient function of VARIANTS' shape (the benchmark's cap sweep)
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def check_previous(previous, x, name="previous"):
    """The second state must match the latent it goes with; returns it in x's dtype and device."""
    if not torch.is_tensor(previous) or previous.shape != x.shape:
        shape = tuple(previous.shape) if torch.is_tensor(previous) else type(previous).__name__
        raise ValueError(f"{name} (the reversible sampler's second state) has shape {shape}, but the latent it "
                         f"goes with has {tuple(x.shape)}: pass the pair that one inversion produced")
    if not torch.isfinite(previous).all():
        raise ValueError(f"{name} (the reversible sampler's second state) contains NaN or infinite values")
    return previous.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_reversible(model, x, sigmas, extra_args=None, callback=None, disable=None, variant=VARIANT,
                      gamma=GAMMA, previous=None):
    """Sample over descending sigmas from x (and `previous`, the state at sigmas[1], where an inversion gave
    one; else an euler step makes it). One model call per step; the last report carries `previous` = y_{n-1}."""
    sigmas = check_sigmas(sigmas, ascending=False).to(x.device)
    s, coefficients = sigmas.tolist(), _coefficients(variant)   # one host copy: coefficients are numbers
    model, upper = CountedModel(model, extra_args), x.to(work_dtype(x))
    denoised = None
    if previous is None:
        denoised = model(upper, sigmas[0]).to(upper.dtype)
        x = euler_step(upper, denoised, sigmas[0], sigmas[1])
    else:
        x = check_previous(previous, upper).to(upper.dtype)
    report(callback, i=0, x=x, sigma=sigmas[0], denoised=denoised, model_calls=model.calls,
           **({"previous": upper} if len(s) == 2 else {}))
    for k in range(1, len(s) - 1):
        a, b, c = coefficients(s[k - 1], s[k], s[k + 1], gamma)
        denoised = model(x, sigmas[k]).to(x.dtype)
        upper, x = x, a * upper + b * x + c * to_d(x, s[k], denoised)
        report(callback, i=k, x=x, sigma=sigmas[k], denoised=denoised, model_calls=model.calls,
               **({"previous": upper} if k == len(s) - 2 else {}))
    return x


@torch.no_grad()
def invert_reversible(model, x, sigmas, extra_args=None, callback=None, disable=None, variant=VARIANT,
                      gamma=GAMMA, previous=None):
    """The exact inverse of `sample_reversible` over ascending sigmas: the start y_0 from which it regenerates
    x; the last report carries `previous` = y_1, the second state the regeneration needs. Where x came from
    elsewhere (an encoded photo), the state beside it, y_{n-1}, is one naive step up (any choice is exact)."""
    sigmas = check_sigmas(sigmas).to(x.device)
    s, coefficients = sigmas.flip(0).tolist(), _coefficients(variant)   # descending, as the sampler's
    model, lower = CountedModel(model, extra_args), x.to(work_dtype(x))
    n = len(s) - 1
    if previous is None:
        x = naive_step(model, lower, sigmas[0], sigmas[1], {}) if n > 1 else lower
    else:
        x = check_previous(previous, lower).to(lower.dtype)
    report(callback, i=0, x=x, sigma=sigmas[1], model_calls=model.calls, **({"previous": lower} if n == 1 else {}))
    for k in range(n - 1, 0, -1):
        a, b, c = coefficients(s[k - 1], s[k], s[k + 1], gamma)
        denoised = model(x, sigmas[n - k]).to(x.dtype)
        lower, x = x, (lower - b * x - c * to_d(x, s[k], denoised)) / a
        report(callback, i=n - k, x=x, sigma=sigmas[n - k + 1], denoised=denoised, model_calls=model.calls,
               **({"previous": lower} if k == 1 else {}))
    return x
