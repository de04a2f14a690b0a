"""Per-sample root finders for residual(x) = 0, shared by the exact-inversion functions.

Batches of shape (B, ...): every sample keeps its own step size, stop mask and best iterate, all
on x's device; the returned iterate is each sample's lowest-residual one. One host sync per
iteration (the stop test); Anderson's small Gram systems travel with it and are solved on the CPU
in float64 (Apple GPUs have no float64).
"""
from dataclasses import dataclass

import torch

from .common import append_dims, per_sample_rms, select


@dataclass
class SolveRecord:
    """What one solve reports, per sample ((B,) tensors on the iterate's device)."""
    residual: torch.Tensor     # RMS of the returned iterate's residual
    iterations: torch.Tensor   # updates taken
    hit_cap: torch.Tensor      # stopped without reaching the tolerance

    def fields(self):
        return {"residual": self.residual, "iterations": self.iterations, "hit_cap": self.hit_cap}


def solve_forward_step(residual, x, tolerance, max_iterations=500, rho=0.5, warmup=20, patience=20,
                       threshold=1e-4, out_of_budget=None):
    """x <- x - rho_k * residual(x), per sample: the schedule of Hong et al.'s released code.

    rho_k rises linearly over `warmup` iterations and halves when the residual has not improved by
    the relative `threshold` for `patience` iterations (like torch's ReduceLROnPlateau).
    """
    batch, device = x.shape[0], x.device
    r = residual(x)
    rms = per_sample_rms(r)
    best_x, best_rms = x, rms
    plateau_best, stale = rms.clone(), torch.zeros(batch, dtype=torch.long, device=device)
    rho_per_sample = torch.full((batch,), float(rho), dtype=rms.dtype, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    for k in range(max_iterations):
        active = best_rms >= tolerance
        if not bool(active.any()) or (out_of_budget is not None and out_of_budget()):
            break
        step = (rho_per_sample * min(1.0, (k + 1) / warmup)).to(x.dtype)
        x = select(active, x - append_dims(step, x) * r, x)
        r = residual(x)
        rms = torch.where(active, per_sample_rms(r), rms)
        iterations += active.long()
        better = active & (rms < best_rms)
        best_x, best_rms = select(better, x, best_x), torch.where(better, rms, best_rms)
        improved = rms < plateau_best * (1 - threshold)
        plateau_best = torch.where(active & improved, rms, plateau_best)
        stale = torch.where(active & ~improved, stale + 1, torch.where(improved, 0, stale))
        halve = active & (stale > patience)
        rho_per_sample = torch.where(halve, rho_per_sample / 2, rho_per_sample)
        stale = torch.where(halve, 0, stale)
    return best_x, SolveRecord(best_rms, iterations, best_rms >= tolerance)


def _anderson_coefficients(d_f, f, active, regularization):
    """gamma = argmin ||f - dF gamma|| per sample by ridge-regularised normal equations.

    The (B, m, m) Gram matrices and the stop flags go to the host in one transfer; the solve runs
    there in float64. Returns (gamma on f's device, whether any sample is still active).
    """
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
    """Type-II Anderson mixing on x <- x - beta * residual(x), per sample.

    x <- x + beta f - (dX + beta dF) gamma with f = -residual and gamma from the last `history`
    difference pairs. Safeguard: an iterate whose residual exceeds `safeguard` x the best so far
    is rejected; that sample restarts from its best point with an empty history and half the beta.
    A sample whose best residual has not improved by the relative `threshold` for `patience`
    iterations stops (an equation with no nearby root should not burn the whole cap). Both solvers stop
    when `out_of_budget()` turns True, returning the best iterates so far.
    """
    batch, shape, device = x.shape[0], x.shape, x.device
    flat = lambda t: t.reshape(batch, -1)  # noqa: E731
    r = residual(x)
    rms = per_sample_rms(r)
    best_x, best_r, best_rms = x, r, rms
    d_x = x.new_zeros(batch, history, flat(x).shape[1])
    d_f = torch.zeros_like(d_x)
    filled = torch.zeros(batch, history, dtype=torch.bool, device=device)
    beta_per_sample = torch.full((batch, 1), float(beta), dtype=x.dtype, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    stall_best, stale = best_rms.clone(), torch.zeros(batch, dtype=torch.long, device=device)
    for k in range(max_iterations):
        active = (best_rms >= tolerance) & (stale <= patience)
        f = -flat(r)
        gamma, any_active = _anderson_coefficients(d_f * filled[..., None], f, active, regularization)
        if not any_active or (out_of_budget is not None and out_of_budget()):
            break
        mixed = beta_per_sample * f - ((d_x + beta_per_sample[..., None] * d_f) * gamma[..., None]).sum(1)
        x_new = select(active, x + mixed.view(shape), x)
        r_new = residual(x_new)
        rms_new = torch.where(active, per_sample_rms(r_new), rms)
        iterations += active.long()
        rejected = active & (~torch.isfinite(rms_new) | (rms_new > safeguard * best_rms))
        accepted = active & ~rejected
        slot = k % history   # accepted samples record their difference pair in this ring slot
        d_x[:, slot] = torch.where(accepted[:, None], flat(x_new - x), d_x[:, slot])
        d_f[:, slot] = torch.where(accepted[:, None], -flat(r_new) - f, d_f[:, slot])
        filled[:, slot] |= accepted
        x, r, rms = select(accepted, x_new, x), select(accepted, r_new, r), torch.where(accepted, rms_new, rms)
        better = accepted & (rms < best_rms)
        best_x, best_r, best_rms = select(better, x, best_x), select(better, r, best_r), torch.where(better, rms, best_rms)
        improved = best_rms < stall_best * (1 - threshold)
        stall_best = torch.where(improved, best_rms, stall_best)
        stale = torch.where(improved, 0, stale + active.long())
        # rejected samples restart from their best point, more cautiously
        x, r, rms = select(rejected, best_x, x), select(rejected, best_r, r), torch.where(rejected, best_rms, rms)
        filled &= ~rejected[:, None]
        beta_per_sample = torch.where(rejected[:, None], beta_per_sample / 2, beta_per_sample)
    return best_x, SolveRecord(best_rms, iterations, best_rms >= tolerance)


SOLVERS = {"anderson": solve_anderson, "fixed_point": solve_forward_step}


def solve(residual, guess, solver, tolerance, max_iterations, options):
    """Dispatch to a named solver ('anderson' or 'fixed_point')."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver](residual, guess, tolerance, max_iterations, **options)
