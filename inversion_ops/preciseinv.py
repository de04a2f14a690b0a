"""PreciseInv (Zuo et al., NeurIPS 2025): per step t -> s (ascending sigmas), learn x_s so that ONE Euler / DDIM
step reproduces x_t, by gradient descent on mean((Step(x_s) - x_t)^2); `tolerance` is the root of the paper's eta.
"""
import math

import torch

from .common import append_dims, check_sigmas, naive_step, report, select, sigma_batch, to_d, work_dtype
from .solvers import SampleTracker, adam_step

# Defaults and policy, read by the nodes.
TOLERANCES = {"precise (1e-5)": math.sqrt(1e-5), "fast (1e-2)": math.sqrt(1e-2)}   # the paper's eta presets
MAX_ITERATIONS = 200
LR = 0.2                # noise units: see docs/results.md#lr
OPTIMIZERS = ("bb", "adam")


class _Counts:
    def __init__(self):
        self.forward, self.backward = 0, 0


def _step_loss(model, x_s, x_t, sigma_s, sigma_t, extra_args):
    """Per-sample mean((euler_step(x_s, D(x_s, s), s, t) - x_t)^2): shape (B,)."""
    denoised = model(x_s, sigma_batch(sigma_s, x_s), **extra_args).to(x_s.dtype)
    x_pred = x_s + to_d(x_s, sigma_s, denoised) * (sigma_t - sigma_s)
    return (x_pred - x_t).flatten(1).pow(2).mean(1)


def _bb_update(x, grad, state, mask, lr_s):
    """Barzilai-Borwein (BB1) steps on the samples in `mask`; a (re)start's first step moves the latent by lr_s."""
    g_rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-30)
    ds, dg = x - state["x_prev"], grad - state["g_prev"]
    sy, ss = (ds * dg).flatten(1).sum(1), ds.flatten(1).pow(2).sum(1)
    bb = torch.where(sy > 0, ss / sy.clamp_min(1e-30), 2 * state["alpha"])  # negative curvature: grow
    alpha = torch.where(state["n"] > 0, bb, lr_s / g_rms)
    state["alpha"] = torch.where(mask, alpha, state["alpha"])
    state["x_prev"], state["g_prev"] = select(mask, x, state["x_prev"]), select(mask, grad, state["g_prev"])
    state["n"] = state["n"] + mask.to(state["n"].dtype)
    return select(mask, x - append_dims(alpha, grad) * grad, x)


def _adam_update(x, grad, state, mask, lr_s):
    """Adam on the samples in `mask`; lr_s is the per-element step in latent units."""
    n = state["n"] + mask.to(state["n"].dtype)
    t, lr = append_dims(n.clamp_min(1), grad), append_dims(lr_s, grad)
    stepped, m, v = adam_step(x, grad, state["m"], state["v"], t, lr, eps=1e-12)
    state.update(n=n, m=select(mask, m, state["m"]), v=select(mask, v, state["v"]))
    return select(mask, stepped, x)


_UPDATES = {"bb": _bb_update, "adam": _adam_update}


def _fresh_state(x):
    zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return {"n": zeros, "alpha": zeros, "m": torch.zeros_like(x), "v": torch.zeros_like(x),
            "x_prev": torch.zeros_like(x), "g_prev": torch.zeros_like(x)}


def preciseinv_step(model, x_t, sigma_t, sigma_s, extra_args, tolerance, max_iterations, lr, optimizer,
                    patience, decay, counts):
    """Learn x_s (sigma_s > sigma_t) so that one Euler / DDIM step s -> t reproduces x_t, per sample, from
    the naive step. A sample that stalls `patience` iterations, or whose loss is not finite, restarts from
    its best latent with lr * decay. Returns (best x_s, residual RMS, iterations, hit_cap)."""
    x = naive_step(model, x_t, sigma_t, sigma_s, extra_args).detach()
    counts.forward += 1
    track, state = SampleTracker(x.clone()), _fresh_state(x)
    lr_s = torch.full_like(track.best_residual, lr * sigma_s)
    for it in range(max_iterations + 1):
        leaf = x.detach().requires_grad_(True)
        loss = _step_loss(model, leaf, x_t, sigma_s, sigma_t, extra_args)
        counts.forward += 1
        rms = loss.detach().sqrt()
        track.update(leaf.detach(), rms, track.active)
        best = track.best_residual
        active = track.keep(~((best < tolerance) | ~torch.isfinite(best) | (it == max_iterations)))
        if not bool(active.any()):   # the one host sync per iteration
            break
        restart = active & ((track.stale >= patience) | ~torch.isfinite(rms))
        step = active & ~restart
        (grad,) = torch.autograd.grad(torch.where(step, loss, 0).sum(), leaf)
        counts.backward += 1
        x = _UPDATES[optimizer](leaf.detach(), grad, state, step, lr_s)
        # restarts: back to the best latent, a smaller first step, fresh optimiser state
        x, lr_s = select(restart, track.best_x, x), torch.where(restart, lr_s * decay, lr_s)
        track.stale = torch.where(restart, 0, track.stale)
        state = {k: select(restart, torch.zeros_like(v), v) for k, v in state.items()}
    return track.best_x.detach(), track.best_residual, track.iterations, track.best_residual >= tolerance


def preciseinv(model, x, sigmas, extra_args=None, callback=None, disable=None, tolerance=TOLERANCES["precise (1e-5)"],
               max_iterations=MAX_ITERATIONS, lr=LR, optimizer="bb", patience=20, decay=0.5):
    """Algorithm 1 (PreciseInv) of Zuo et al. (2025) for Euler / DDIM. `lr` is in noise units (the latent moves
    about lr * sigma); `optimizer` 'bb' (see docs/results.md#optimizer) or 'adam'. Gradients go to the latent only."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    sigmas = check_sigmas(sigmas).detach().cpu().double().tolist()   # plain floats: one host copy
    extra_args, counts = extra_args or {}, _Counts()
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().to(work_dtype(x))
        for i in range(len(sigmas) - 1):
            x, rms, iterations, hit_cap = preciseinv_step(model, x, sigmas[i], sigmas[i + 1], extra_args, tolerance,
                                                          max_iterations, lr, optimizer, patience, decay, counts)
            report(callback, i=i, x=x, sigma=x.new_tensor(sigmas[i + 1]), residual=rms, iterations=iterations,
                   hit_cap=hit_cap, model_calls=counts.forward, model_calls_backward=counts.backward)
    return x
