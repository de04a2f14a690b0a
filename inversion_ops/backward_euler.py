"""Exact inversion of ComfyUI's Euler / DDIM and DPM-Solver++(2M) samplers by backward Euler.

Hong, Shin, Choi, Jeon & Cho (CVPR 2024), "On Exact Inversion of DPM-Solvers", arXiv 2311.18387.

Conventions (k-diffusion's, in ComfyUI's sigma coordinates):
- `denoise(x, sigma) -> x0` with CFG already applied; `sigma` is passed as a (B,) tensor.
- Inversions take ASCENDING sigmas (sigmas[0] the least noisy, usually 0.0; sigmas[-1] the
  noisiest) and walk them upwards; the forward samplers take the usual descending sigmas.
- Everything goes through D and sigma only, so EPS, V_PREDICTION and flow (CONST, where
  sigma_max may be exactly 1.0) share one code path; nothing divides by (1 - sigma).
- Tolerances are per element: the RMS of a sample's residual (common.per_sample_rms).
- `model_calls` counts calls of `denoise` on a batch (one CFG call counts once);
  `sample_evaluations` counts, per sample, the rows it was evaluated in.
"""
from dataclasses import dataclass, field

import torch

from .common import InversionInfo, batch_view, euler_step, per_sample_rms, select, to_d


@dataclass
class BackwardEulerInfo(InversionInfo):
    """InversionInfo plus per-sample counts; `iterations` stays the max over the batch."""
    sample_iterations: list = field(default_factory=list)   # per step: per-sample iterations
    sample_evaluations: list = field(default_factory=list)  # per sample: rows evaluated in total
    pass_changes: list = field(default_factory=list)        # dpmpp_2m refine passes: per-sample RMS state change

    def add_step(self, record):
        self.residuals.append(record.rms.tolist())
        self.iterations.append(int(record.iterations.max()))
        self.sample_iterations.append(record.iterations.tolist())
        self.hit_cap.append(record.hit_cap.tolist())


@dataclass
class SolveRecord:
    """What one per-step solve reports, per sample (tensors of shape (B,))."""
    rms: torch.Tensor          # final residual RMS
    iterations: torch.Tensor   # updates taken
    hit_cap: torch.Tensor      # stopped at max_iters without reaching tol


def _counted_denoiser(denoise, info, batch_size, active_only):
    """Wrap `denoise` so every call is counted; with active_only, evaluate only the rows asked for.

    active_only assumes the rows of a batch are independent and share one conditioning (true for
    the analytic models; a per-sample conditioning batch would be mismatched by the row subset).
    """
    info.sample_evaluations = [0] * batch_size

    def evaluate(x, sigma, rows=None):
        info.model_calls += 1
        if rows is None or not active_only or bool(rows.all()):
            for b in range(batch_size):
                info.sample_evaluations[b] += 1
            return denoise(x, sigma * x.new_ones(x.shape[0]))
        for b in rows.nonzero().flatten().tolist():
            info.sample_evaluations[b] += 1
        out = x.clone()   # rows not evaluated keep a finite placeholder; solvers ignore them
        out[rows] = denoise(x[rows], sigma * x.new_ones(int(rows.sum())))
        return out

    return evaluate


def _ascending(sigmas, x):
    sigmas = torch.as_tensor(sigmas, device=x.device)
    if not sigmas.is_floating_point():
        sigmas = sigmas.to(x.dtype)
    if len(sigmas) < 2 or sigmas[0] >= sigmas[-1]:
        raise ValueError("inversion takes ascending sigmas (least noisy first); flip ComfyUI's SIGMAS")
    return sigmas


def _labelled_naive_step(evaluate, x, sigma_known, sigma):
    """The authors' initial guess: one naive step up, with D evaluated at x labelled with the
    noisier sigma (so nothing divides by sigma_known, which may be 0)."""
    return x + to_d(x, evaluate(x, sigma), sigma) * (sigma - sigma_known)


# ---------------------------------------------------------------- per-sample root finders

def solve_forward_step(residual, x, tol, max_iters=500, rho=0.5, warmup=20, patience=20,
                       threshold=1e-4):
    """Find x with residual(x) = 0 by forward steps x <- x - rho_k * residual(x), per sample.

    The authors' schedule: rho_k rises linearly over `warmup` iterations, and halves when the
    residual has not improved by the relative `threshold` for `patience` iterations (like torch's
    ReduceLROnPlateau). `residual(x, rows)` may leave rows outside the (B,) mask `rows` unset.
    Returns the best iterate per sample and a SolveRecord.
    """
    batch = x.shape[0]
    r = residual(x, None)
    rms = per_sample_rms(r)
    best_x, best_rms = x, rms
    plateau_best, stale = rms.clone(), torch.zeros(batch, dtype=torch.long)
    rho_per_sample = torch.full((batch,), float(rho), dtype=torch.float64)
    iterations = torch.zeros(batch, dtype=torch.long)
    for k in range(max_iters):
        active = best_rms >= tol
        if not active.any():
            break
        step = (rho_per_sample * min(1.0, (k + 1) / warmup)).to(x.dtype).to(x.device)
        x = select(active, x - batch_view(step, x) * r, x)
        r = residual(x, active)
        rms = torch.where(active, per_sample_rms(r), rms)
        iterations += active.long()
        better = active & (rms < best_rms)
        best_x, best_rms = select(better, x, best_x), torch.where(better, rms, best_rms)
        # plateau: halve rho after `patience` iterations without a relative improvement
        improved = rms < plateau_best * (1 - threshold)
        plateau_best = torch.where(active & improved, rms, plateau_best)
        stale = torch.where(active & ~improved, stale + 1, torch.where(improved, 0, stale))
        halve = active & (stale > patience)
        rho_per_sample = torch.where(halve, rho_per_sample / 2, rho_per_sample)
        stale = torch.where(halve, 0, stale)
    return best_x, SolveRecord(best_rms, iterations, best_rms >= tol)


def solve_anderson(residual, x, tol, max_iters=500, history=5, beta=1.0, safeguard=10.0,
                   regularization=1e-10, patience=30, threshold=1e-3):
    """Find x with residual(x) = 0 by type-II Anderson mixing on x <- x - beta * residual(x).

    Per sample: gamma = argmin ||f - dF gamma|| over the last `history` differences (ridge-
    regularised normal equations in float64), then x <- x + beta f - (dX + beta dF) gamma with
    f = -residual. Safeguard: an iterate whose residual exceeds `safeguard` x the best so far is
    rejected; that sample restarts from its best point with an empty history and half the beta.
    A sample whose best residual has not improved by the relative `threshold` for `patience`
    iterations stops there (an equation with no nearby root should not burn the whole cap).
    """
    batch, shape = x.shape[0], x.shape
    flat = lambda t: t.reshape(batch, -1)
    r = residual(x, None)
    rms = per_sample_rms(r)
    best_x, best_r, best_rms = x, r, rms
    d_x = x.new_zeros(batch, history, flat(x).shape[1])
    d_f = torch.zeros_like(d_x)
    filled = torch.zeros(batch, history, dtype=torch.bool, device=x.device)
    beta_per_sample = torch.full((batch,), float(beta), dtype=x.dtype, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.long)
    eye = torch.eye(history, dtype=torch.float64, device=x.device)
    stall_best, stale = best_rms.clone(), torch.zeros(batch, dtype=torch.long)
    for k in range(max_iters):
        active = (best_rms >= tol) & (stale <= patience)
        if not active.any():
            break
        f = -flat(r)
        d_f64 = d_f.double() * filled[..., None]
        gram = d_f64 @ d_f64.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)
        gram = gram + eye * (regularization * scale + 1e-300)[:, None, None]
        gamma = torch.linalg.solve(gram, d_f64 @ f.double()[..., None]).squeeze(-1).to(x.dtype)
        beta_b = beta_per_sample[:, None]
        mixed = beta_b * f - ((d_x + beta_b[..., None] * d_f) * gamma[..., None]).sum(1)
        x_new = select(active.to(x.device), x + mixed.view(shape), x)
        r_new = residual(x_new, active.to(x.device))
        rms_new = torch.where(active, per_sample_rms(r_new), rms)
        iterations += active.long()
        rejected = active & (~torch.isfinite(rms_new) | (rms_new > safeguard * best_rms))
        accepted = active & ~rejected
        # accepted samples record the difference pair in ring slot k % history
        slot = k % history
        acc = accepted.to(x.device)
        d_x[:, slot] = torch.where(acc[:, None], flat(x_new - x), d_x[:, slot])
        d_f[:, slot] = torch.where(acc[:, None], -flat(r_new) - f, d_f[:, slot])
        filled[:, slot] |= acc
        x, r, rms = select(acc, x_new, x), select(acc, r_new, r), torch.where(accepted, rms_new, rms)
        better = accepted & (rms < best_rms)
        best_x, best_r = select(better.to(x.device), x, best_x), select(better.to(x.device), r, best_r)
        best_rms = torch.where(better, rms, best_rms)
        improved = best_rms < stall_best * (1 - threshold)
        stall_best = torch.where(improved, best_rms, stall_best)
        stale = torch.where(improved, 0, stale + active.long())
        # rejected samples restart from their best point, more cautiously
        rej = rejected.to(x.device)
        x, r, rms = select(rej, best_x, x), select(rej, best_r, r), torch.where(rejected, best_rms, rms)
        filled &= ~rej[:, None]
        beta_per_sample = torch.where(rej, beta_per_sample / 2, beta_per_sample)
    return best_x, SolveRecord(best_rms, iterations, best_rms >= tol)


def _solve(residual, guess, solver, tol, max_iters, options):
    if solver == "anderson":
        return solve_anderson(residual, guess, tol, max_iters, **options)
    if solver == "fixed_point":
        return solve_forward_step(residual, guess, tol, max_iters, **options)
    raise ValueError(f"solver must be 'anderson' or 'fixed_point', got {solver!r}")


# ---------------------------------------------------------------- forward samplers (references)

def dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """One step of ComfyUI's `sample_dpmpp_2m` (Lu et al. 2022), with its exact arithmetic.

    First-order when old_denoised is None (first step) or sigma_next == 0 (last step).
    """
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    h = t_next - t
    ratio = t_next.neg().exp() / t.neg().exp()
    if old_denoised is None or sigma_next == 0:
        return ratio * x - (-h).expm1() * denoised
    r = (t - sigma_prev.log().neg()) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - (-h).expm1() * denoised_d


def sample_euler(denoise, x, sigmas):
    """ComfyUI's `sample_euler` / `ddim` without churn (Karras et al. 2022, Algorithm 2)."""
    for i in range(len(sigmas) - 1):
        x = euler_step(x, denoise(x, sigmas[i] * x.new_ones(x.shape[0])), sigmas[i], sigmas[i + 1])
    return x


def sample_dpmpp_2m(denoise, x, sigmas):
    """ComfyUI's `sample_dpmpp_2m` (DPM-Solver++(2M), Lu et al. 2022)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * x.new_ones(x.shape[0]))
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigmas[i], sigmas[i + 1])
        old_denoised = denoised
    return x


# ---------------------------------------------------------------- inversions

def naive_inversion(denoise, x, sigmas, callback=None):
    """Naive DDIM / Euler inversion: explicit Euler up the ascending sigmas, exactly what
    ComfyUI's FlipSigmas (a leading 0 becomes 1e-4) + SamplerCustom(euler) computes."""
    sigmas = _ascending(sigmas, x).clone()
    if sigmas[0] == 0:
        sigmas[0] = 1e-4
    info = BackwardEulerInfo()
    evaluate = _counted_denoiser(denoise, info, x.shape[0], active_only=False)
    for i in range(len(sigmas) - 1):
        x = euler_step(x, evaluate(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        info.iterations.append(0)
        info.sample_iterations.append([0] * x.shape[0])
        info.hit_cap.append([False] * x.shape[0])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i + 1]})
    return x, info


def exact_inversion_euler(denoise, x, sigmas, solver="anderson", tol=1e-5, max_iters=500,
                          active_only=False, callback=None, **solver_options):
    """Exact inversion of ComfyUI's euler / ddim by backward Euler (Hong et al. 2024, Alg. 1).

    For each sampling step sigma -> sigma_known, solve euler_step(x_s, D(x_s, sigma), sigma,
    sigma_known) = x_known for x_s, starting from the authors' naive guess. `solver` is
    'fixed_point' (the paper's forward steps) or 'anderson'; `solver_options` go to it.
    """
    sigmas = _ascending(sigmas, x)
    info = BackwardEulerInfo()
    evaluate = _counted_denoiser(denoise, info, x.shape[0], active_only)
    for i in range(len(sigmas) - 1):
        sigma_known, sigma, x_known = sigmas[i], sigmas[i + 1], x

        def residual(x_s, rows):
            return euler_step(x_s, evaluate(x_s, sigma, rows), sigma, sigma_known) - x_known

        guess = _labelled_naive_step(evaluate, x_known, sigma_known, sigma)
        x, record = _solve(residual, guess, solver, tol, max_iters, solver_options)
        info.add_step(record)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "residual": record.rms})
    return x, info


def _fine_naive_path(evaluate, x, sigma_points):
    """Naive Euler inversion through the given ascending sigmas; returns the state at each."""
    states = [x]
    for a, b in zip(sigma_points[:-1], sigma_points[1:]):
        x = euler_step(x, evaluate(x, a), a, b)
        states.append(x)
    return states


def _dpmpp_2m_pass(evaluate, x, sigmas, previous, solver, tol, max_iters, substeps, info,
                   callback, solver_options):
    """One upward pass: solve every step of dpmpp_2m for the noisier state, with old_denoised
    held fixed at D(previous state two levels up), or, without `previous`, at a fine naive
    estimate of it. Returns the states at every sigma (ascending), x first."""
    n = len(sigmas) - 1
    states = [x]
    for i in range(n):
        sigma_known, sigma, x_known = sigmas[i], sigmas[i + 1], x
        old_denoised, sigma_prev = None, None
        if sigma_known != 0 and i + 1 < n:     # ComfyUI's second-order steps
            sigma_prev = sigmas[i + 2]
        if previous is not None:
            guess = previous[i + 1]
            if sigma_prev is not None:
                old_denoised = evaluate(previous[i + 2], sigma_prev)
        elif sigma_prev is None:
            guess = _labelled_naive_step(evaluate, x_known, sigma_known, sigma)
        else:
            points = torch.cat([
                torch.linspace(sigma_known.log(), sigma.log(), substeps + 1)[:-1],
                torch.linspace(sigma.log(), sigma_prev.log(), substeps + 1)]).to(sigmas).exp()
            points[0], points[substeps], points[-1] = sigma_known, sigma, sigma_prev
            path = _fine_naive_path(evaluate, x_known, points)
            guess, old_denoised = path[substeps], evaluate(path[-1], sigma_prev)

        def residual(x_s, rows):
            denoised = evaluate(x_s, sigma, rows)
            return dpmpp_2m_step(x_s, denoised, old_denoised, sigma_prev, sigma, sigma_known) - x_known

        x, record = _solve(residual, guess, solver, tol, max_iters, solver_options)
        states.append(x)
        info.add_step(record)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "residual": record.rms})
    return states


def exact_inversion_dpmpp_2m(denoise, x, sigmas, solver="anderson", tol=1e-5, max_iters=500,
                             substeps=10, refine_passes=4, refine="anderson", active_only=False,
                             callback=None, **solver_options):
    """Exact inversion of ComfyUI's dpmpp_2m by backward Euler with the high-order term
    approximated and held fixed (Hong et al. 2024, Alg. 2), then refined.

    An interior step needs old_denoised = D(x_prev, sigma_prev) at the next, still unknown,
    noisier state. Pass 0 (the paper's method) estimates x_prev by a fine naive inversion
    (`substeps` log-spaced Euler sub-steps per interval) from the known state, holds
    old_denoised fixed and solves the remaining equation in x_s as `exact_inversion_euler` does.
    Refine passes (our addition) re-solve every step with old_denoised taken from the previous
    pass's states; their fixed point inverts the sampler exactly. refine='plain' iterates the
    passes, refine='anderson' mixes them; stop when the states move less than `tol` (RMS).
    """
    sigmas = _ascending(sigmas, x)
    info = BackwardEulerInfo()
    evaluate = _counted_denoiser(denoise, info, x.shape[0], active_only)
    run_pass = lambda previous: _dpmpp_2m_pass(evaluate, x, sigmas, previous, solver, tol,
                                               max_iters, substeps, info, callback, solver_options)
    states = torch.stack(run_pass(None), 1)          # (B, levels, ...)
    if refine_passes == 0:
        return states[:, -1], info

    def pass_residual(stacked, rows):
        change = stacked - torch.stack(run_pass(list(stacked.unbind(1))), 1)
        info.pass_changes.append(per_sample_rms(change).tolist())
        return change

    if refine == "anderson":
        states, _ = solve_anderson(pass_residual, states, tol, refine_passes)
    elif refine == "plain":
        states, _ = solve_forward_step(pass_residual, states, tol, refine_passes, rho=1.0, warmup=1)
    else:
        raise ValueError(f"refine must be 'anderson' or 'plain', got {refine!r}")
    return states[:, -1], info
