"""Per-sample iteration helpers: the best-iterate tracker, Adam, and the root finders for residual(x) = 0."""
import math
from dataclasses import dataclass

import torch

from .common import append_dims, per_sample_rms, select


class SampleTracker:
    """Per sample: the lowest-residual iterate so far, updates taken, updates since the best last fell by
    the relative `threshold`, and whether it still iterates. Tensors are replaced, never written in place,
    so what a callback keeps stays valid."""

    def __init__(self, x, residual=None, threshold=0.0):
        batch, device = x.shape[0], x.device
        # without a first residual the first update only scores the start: it is not an iteration
        self.scored = torch.full((batch,), residual is not None, dtype=torch.bool, device=device)
        if residual is None:
            residual = torch.full((batch,), math.inf, dtype=x.dtype, device=device)
        self.best_x, self.best_residual, self.mark, self.threshold = x, residual, residual, threshold
        self.iterations = self.stale = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)

    def update(self, x, residual, mask):
        """Score iterate `x` on the rows in `mask`; returns where it is a new best."""
        better = mask & (residual < self.best_residual)
        self.best_x = select(better, x, self.best_x)
        self.best_residual = torch.where(better, residual, self.best_residual)
        gained = self.best_residual < self.mark * (1 - self.threshold)
        self.mark = torch.where(gained, self.best_residual, self.mark)
        self.stale = torch.where(gained, 0, self.stale + mask.long())
        self.iterations = self.iterations + (mask & self.scored).long()
        self.scored = self.scored | mask
        return better

    def keep(self, going):
        """Stop every sample where `going` is False; returns the samples still iterating."""
        self.active = self.active & going
        return self.active

    def record(self, tolerance):
        return SolveRecord(self.best_residual, self.iterations, self.best_residual >= tolerance)


@dataclass
class SolveRecord:
    """What one solve reports, per sample ((B,) tensors on the iterate's device)."""
    residual: torch.Tensor     # RMS of the returned iterate's residual
    iterations: torch.Tensor   # updates taken
    hit_cap: torch.Tensor      # stopped without reaching the tolerance

    def fields(self):
        return {"residual": self.residual, "iterations": self.iterations, "hit_cap": self.hit_cap}


def adam_step(x, grad, m, v, t, lr, eps, betas=(0.9, 0.999)):
    """One bias-corrected Adam update (Kingma & Ba 2015) of x along grad; t counts from 1.

    t and lr are numbers or tensors broadcastable to x (one per sample). Returns (x, m, v)."""
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad * grad
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return x - lr * m_hat / (v_hat.sqrt() + eps), m, v


def solve_forward_step(residual, x, tolerance, max_iterations=500, rho=0.5, warmup=20, patience=20,
                       threshold=1e-4, out_of_budget=None):
    """x <- x - rho_k * residual(x) per sample, with the step schedule of Hong et al.'s released code:
    linear warm-up, then rho_k halves after `patience` iterations without a `threshold` gain."""
    r = residual(x)
    track = SampleTracker(x, per_sample_rms(r), threshold)
    rho_per_sample = torch.full_like(track.best_residual, float(rho))
    for k in range(max_iterations):
        active = track.keep(track.best_residual >= tolerance)
        if not bool(active.any()) or (out_of_budget is not None and out_of_budget()):
            break
        step = (rho_per_sample * min(1.0, (k + 1) / warmup)).to(x.dtype)
        x = select(active, x - append_dims(step, x) * r, x)
        r = residual(x)
        track.update(x, per_sample_rms(r), active)
        halve = active & (track.stale > patience)
        rho_per_sample = torch.where(halve, rho_per_sample / 2, rho_per_sample)
        track.stale = torch.where(halve, 0, track.stale)
    return track.best_x, track.record(tolerance)


def _anderson_coefficients(d_f, f, active, regularization):
    """gamma = argmin ||f - dF gamma|| per sample, by ridge-regularised normal equations solved in float64
    on the host (one transfer with the stop flags). Returns (gamma on f's device, whether any is active)."""
    batch, history = d_f.shape[:2]
    gram = d_f @ d_f.transpose(1, 2)
    rhs = d_f @ f[..., None]
    packed = torch.cat([gram.flatten(), rhs.flatten(), active.to(gram.dtype)]).cpu().double()
    if not bool(packed[-batch:].any()):
        return None, False
    n = batch * history * history
    gram, rhs = packed[:n].view(batch, history, history), packed[n:n + batch * history].view(batch, history, 1)
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)
    ridge = torch.eye(history, dtype=torch.float64)   # cpu: the small solve runs on the host in float64
    gram = gram + ridge * (regularization * scale + 1e-300)[:, None, None]
    gamma = torch.linalg.solve(gram, rhs).squeeze(-1)
    return gamma.to(device=f.device, dtype=f.dtype), True


def solve_anderson(residual, x, tolerance, max_iterations=500, history=5, beta=1.0, safeguard=10.0,
                   regularization=1e-10, patience=30, threshold=1e-3, out_of_budget=None):
    """Type-II Anderson mixing on x <- x - beta * residual(x), per sample, over the last `history` pairs.

    An iterate whose residual exceeds `safeguard` x the best is refused: that sample restarts from its best
    with an empty history and half the beta. A sample stops after `patience` iterations without a gain."""
    batch, shape = x.shape[0], x.shape
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    r = residual(x)
    rms = per_sample_rms(r)
    track, best_r = SampleTracker(x, rms, threshold), r
    d_x = x.new_zeros(batch, history, flat(x).shape[1])
    d_f, filled = torch.zeros_like(d_x), torch.zeros(batch, history, dtype=torch.bool, device=x.device)
    beta_per_sample = torch.full((batch, 1), float(beta), dtype=x.dtype, device=x.device)
    for k in range(max_iterations):
        active = track.keep((track.best_residual >= tolerance) & (track.stale <= patience))
        f = -flat(r)
        gamma, any_active = _anderson_coefficients(d_f * filled[..., None], f, active, regularization)
        if not any_active or (out_of_budget is not None and out_of_budget()):
            break
        mixed = beta_per_sample * f - ((d_x + beta_per_sample[..., None] * d_f) * gamma[..., None]).sum(1)
        x_new = select(active, x + mixed.view(shape), x)
        r_new = residual(x_new)
        rms_new = torch.where(active, per_sample_rms(r_new), rms)
        rejected = active & (~torch.isfinite(rms_new) | (rms_new > safeguard * track.best_residual))
        accepted = active & ~rejected
        slot = k % history   # accepted samples record their difference pair in this ring slot
        d_x[:, slot] = torch.where(accepted[:, None], flat(x_new - x), d_x[:, slot])
        d_f[:, slot] = torch.where(accepted[:, None], -flat(r_new) - f, d_f[:, slot])
        filled[:, slot] |= accepted
        x, r, rms = select(accepted, x_new, x), select(accepted, r_new, r), torch.where(accepted, rms_new, rms)
        best_r = select(track.update(x, rms, active), r, best_r)
        x, r = select(rejected, track.best_x, x), select(rejected, best_r, r)
        rms = torch.where(rejected, track.best_residual, rms)
        filled &= ~rejected[:, None]
        beta_per_sample = torch.where(rejected[:, None], beta_per_sample / 2, beta_per_sample)
    return track.best_x, track.record(tolerance)


SOLVERS = {"anderson": solve_anderson, "fixed_point": solve_forward_step}


def solve(residual, guess, solver, tolerance, max_iterations, options):
    """Dispatch to a named solver ('anderson' or 'fixed_point')."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver](residual, guess, tolerance, max_iterations, **options)
