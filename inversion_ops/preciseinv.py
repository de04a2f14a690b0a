"""PreciseInv (Zuo et al., NeurIPS 2025): per-step learned-noise inversion of a DDIM / Euler sampler.

Sigmas are ComfyUI's (EPS: x = x0 + sigma*n; flow: x = (1 - sigma)*x0 + sigma*n), given ascending
(the sampling schedule flipped, usually starting at 0). For each step t -> s (t < s) the latent
x_s is learned so that ONE sampler step `euler_step(x_s, D(x_s, s), s, t)` reproduces the already
inverted x_t: gradient descent on the per-element loss mean((Step(x_s) - x_t)^2), started from a
naive inversion step (the model at x_t labelled with sigma s, the authors' guess), until the loss
is below `eta` (the paper's `while L < eta` read as `while L > eta`) or `max_iters` is reached.

Learning x_s is learning the paper's noise eps_s = (x_s - a_s*x0) / s up to the factor s, so `lr`
is in noise units: the latent moves by about lr * s per element (first step of a run).
Step sizes: Barzilai-Borwein by default (measured on the analytic model, 12 EPS / flow, cfg 1 / 3,
2-10 step cases at eta 1e-5: about 3x fewer model calls and 12 dB better mean reconstruction
than Adam with the same lr and restarts); Adam is available.
Gradient descent on a squared residual can stall at a stationary point with a non-zero residual
(seen with cfg 3 on the analytic model, where backward Euler's root finder does not): check
`info.hit_cap` / `info.residuals`.

Precision: the latent is optimised in float32 (float64 if x0 is float64) whatever the denoiser
returns; its output is cast to that dtype; fp16 / bf16 inputs are promoted to float32. Gradients
go to the latent only (torch.autograd.grad on a leaf of our own); model weights that are
inference tensors cannot be used (autograd must save them for the input gradient).
"""
import math
from dataclasses import dataclass, field

import torch

from .common import InversionInfo, batch_view, to_d


@dataclass
class PreciseInvInfo(InversionInfo):
    """InversionInfo plus PreciseInv's record.

    model_calls counts forward calls of `denoise` (each on the samples still active);
    model_calls_backward counts backward passes through it. residuals[k] holds the per-sample
    final loss mean((Step(x_s) - x_t)^2) of step k (of the returned latent), initial_losses[k]
    the loss of the naive initialisation, iterations[k] the loop iterations used (max over the
    batch; each is one forward, plus one backward unless it restarts), iterations_per_sample[k]
    per sample, hit_cap[k] per sample whether it stopped without reaching eta (at max_iters).
    """
    model_calls_backward: int = 0
    initial_losses: list = field(default_factory=list)
    iterations_per_sample: list = field(default_factory=list)

    @property
    def model_calls_forward(self):
        return self.model_calls


def _sigma_in(sigma, x):
    """The sigma of every sample as a (B,) tensor, as ComfyUI passes it to the model."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def naive_inversion_step(denoise, x, sigma, sigma_next):
    """One DDIM / Euler inversion step sigma -> sigma_next (noisier), the model evaluated at the
    current latent labelled with the noisier sigma (DDIM inversion's usual approximation)."""
    denoised = denoise(x, _sigma_in(sigma_next, x)).to(x.dtype)
    return x + to_d(x, denoised, sigma_next) * (sigma_next - sigma)


def naive_inversion(denoise, x0, sigmas):
    """Naive DDIM / Euler inversion along ascending sigmas; returns (x_T, InversionInfo)."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x = x0.detach().clone().to(dtype)
    info = InversionInfo()
    for i in range(len(sigmas) - 1):
        x = naive_inversion_step(denoise, x, float(sigmas[i]), float(sigmas[i + 1])).detach()
        info.model_calls += 1
    return x, info


def _step_loss(denoise, x_s, x_t, sigma_s, sigma_t):
    """Per-sample mean((euler_step(x_s, D(x_s, s), s, t) - x_t)^2): shape (B,)."""
    denoised = denoise(x_s, _sigma_in(sigma_s, x_s)).to(x_s.dtype)
    x_pred = x_s + to_d(x_s, denoised, sigma_s) * (sigma_t - sigma_s)
    return (x_pred - x_t).flatten(1).pow(2).mean(1)


def _bb_update(x, grad, state, idx, lr_s):
    """Gradient descent with Barzilai-Borwein (BB1) step sizes, per sample; the first step after a
    (re)start moves the latent by RMS lr_s."""
    g_rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-30)
    ds, dg = x - state["x_prev"][idx], grad - state["g_prev"][idx]
    sy, ss = (ds * dg).flatten(1).sum(1), ds.flatten(1).pow(2).sum(1)
    bb = torch.where(sy > 0, ss / sy.clamp_min(1e-30), 2 * state["alpha"][idx])  # negative curvature: grow
    alpha = torch.where(state["n"][idx] > 0, bb, lr_s[idx] / g_rms)
    state["alpha"][idx], state["x_prev"][idx], state["g_prev"][idx] = alpha, x, grad
    state["n"][idx] += 1
    return x - batch_view(alpha, grad) * grad


def _adam_update(x, grad, state, idx, lr_s, betas=(0.9, 0.999)):
    """Adam (Kingma & Ba) per sample; lr_s is the per-element step size in latent units."""
    state["n"][idx] += 1
    n = state["n"][idx]
    state["m"][idx] = m = betas[0] * state["m"][idx] + (1 - betas[0]) * grad
    state["v"][idx] = v = betas[1] * state["v"][idx] + (1 - betas[1]) * grad * grad
    m_hat, v_hat = m / batch_view(1 - betas[0] ** n, grad), v / batch_view(1 - betas[1] ** n, grad)
    return x - batch_view(lr_s[idx], grad) * m_hat / (v_hat.sqrt() + 1e-12)


def preciseinv_step(denoise, x_t, sigma_t, sigma_s, eta=1e-5, max_iters=200, lr=0.2, optimizer="bb",
                    patience=20, decay=0.5, x_init=None, info=None, active_only=True):
    """Learn x_s (sigma_s > sigma_t) so that one Euler / DDIM step s -> t reproduces x_t; returns x_s.

    Per sample: start from `x_init` (default: a naive inversion step), minimise
    mean((Step(x_s) - x_t)^2) by gradient steps (`optimizer` "bb": Barzilai-Borwein step sizes,
    "adam": Adam), lr in noise units (the latent moves by about lr * sigma_s per element on the
    first step; for Adam on every step). A sample whose best loss has not improved for `patience`
    iterations, or whose loss is not finite, restarts from its best latent with lr * decay. It
    stops once its loss is below eta or after max_iters gradient steps; the best latent is kept.
    active_only: call `denoise` on the samples still running only; False calls it on the whole batch
    every time (for denoisers whose conditioning or mask is per batch row, e.g. ComfyUI's), the
    finished rows just not being updated. Must run with autograd enabled (see `preciseinv`).
    """
    info = info if info is not None else PreciseInvInfo()
    if optimizer not in ("bb", "adam"):
        raise ValueError(f"optimizer must be 'bb' or 'adam', got {optimizer!r}")
    b, dev, dt = x_t.shape[0], x_t.device, x_t.dtype
    if x_init is None:
        x_init = naive_inversion_step(denoise, x_t, sigma_t, sigma_s)
        info.model_calls += 1
    x = x_init.detach().clone()
    best_x = x.clone()
    best_loss = torch.full((b,), math.inf, dtype=dt, device=dev)
    first_loss = torch.full((b,), math.inf, dtype=dt, device=dev)
    lr_s = torch.full((b,), lr * sigma_s, dtype=dt, device=dev)
    stale = torch.zeros(b, dtype=torch.long, device=dev)
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    zeros = torch.zeros(b, dtype=dt, device=dev)
    state = {"n": zeros.clone(), "alpha": zeros.clone(), "m": torch.zeros_like(x), "v": torch.zeros_like(x),
             "x_prev": torch.zeros_like(x), "g_prev": torch.zeros_like(x)}
    for it in range(max_iters + 1):
        idx = active.nonzero().squeeze(1)
        rows = idx if active_only else torch.arange(b, device=dev)
        leaf = x[rows].detach().requires_grad_(True)
        loss_rows = _step_loss(denoise, leaf, x_t[rows], sigma_s, sigma_t)
        info.model_calls += 1
        pick = slice(None) if active_only else idx   # the active samples among the evaluated rows
        loss, x_active = loss_rows[pick], leaf.detach()[pick]
        loss_d = loss.detach()
        if it == 0:
            first_loss[idx] = loss_d
        finite = torch.isfinite(loss_d)
        improved = finite & (loss_d < best_loss[idx])
        best_loss[idx] = torch.where(improved, loss_d, best_loss[idx])
        best_x[idx] = torch.where(batch_view(improved, x_active), x_active, best_x[idx])
        stale[idx] = torch.where(improved, torch.zeros_like(stale[idx]), stale[idx] + 1)
        done = (best_loss[idx] < eta) | ~torch.isfinite(best_loss[idx]) | (it == max_iters)
        active[idx[done]] = False
        restart = ~done & ((stale[idx] >= patience) | ~finite)
        step = ~done & ~restart
        r_idx = idx[restart]
        if len(r_idx):   # back to the best latent, smaller first step, fresh optimiser state
            x[r_idx], lr_s[r_idx], stale[r_idx] = best_x[r_idx], lr_s[r_idx] * decay, 0
            for k in state:
                state[k][r_idx] = 0
            iters[r_idx] += 1
        if not step.any():
            if not active.any():
                break
            continue
        (grad,) = torch.autograd.grad(loss[step].sum(), leaf)
        info.model_calls_backward += 1
        s_idx, grad, x_cur = idx[step], grad[pick][step], x_active[step]
        update = _bb_update if optimizer == "bb" else _adam_update
        x[s_idx] = update(x_cur, grad, state, s_idx, lr_s)
        iters[s_idx] += 1
    info.residuals.append(best_loss.tolist())
    info.initial_losses.append(first_loss.tolist())
    info.iterations.append(int(iters.max()))
    info.iterations_per_sample.append(iters.tolist())
    info.hit_cap.append((best_loss >= eta).tolist())
    return best_x.detach()


def preciseinv(denoise, x0, sigmas, eta=1e-5, max_iters=200, lr=0.2, optimizer="bb", patience=20,
               decay=0.5, callback=None, active_only=True):
    """Implements Algorithm 1 (PreciseInv) of Zuo et al. (2025) for ComfyUI's Euler / DDIM sampler.

    denoise(x, sigma) -> D(x) with sigma a (B,) tensor; x0 (B, ...) the clean latent (the latent at
    sigmas[0]); sigmas ascending, e.g. ComfyUI's schedule flipped (flow may end at exactly 1).
    eta: per-sample threshold on the per-element MSE of each step (1e-2 fast, 1e-5 precise);
    max_iters, lr, optimizer, patience, decay, active_only: see `preciseinv_step`. Returns
    (x_T, PreciseInvInfo), x_T detached, float32 (float64 for float64 x0). Gradients flow only to the latent being
    learned; safe to call under torch.inference_mode() with inference-tensor inputs.
    """
    sigmas = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).detach().flatten().tolist()]
    dtype = torch.promote_types(x0.dtype, torch.float32)
    info = PreciseInvInfo()
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.detach().clone().to(dtype)
        for i in range(len(sigmas) - 1):
            x = preciseinv_step(denoise, x, sigmas[i], sigmas[i + 1], eta=eta, max_iters=max_iters,
                                lr=lr, optimizer=optimizer, patience=patience, decay=decay, info=info,
                                active_only=active_only)
            if callback is not None:
                callback({'x': x, 'i': i, 'sigma': sigmas[i + 1], 'loss': info.residuals[-1]})
    return x, info
