"""Exact inversion by backward Euler (Hong et al., CVPR 2024, "On Exact Inversion of DPM-Solvers") and naive
inversion, over ASCENDING sigmas, through D and sigma only (EPS, V_PREDICTION and flow alike)."""
import torch

from .common import SIGMA_FLOOR, CountedModel, check_sigmas, euler_step, naive_step, report, sigma_batch, work_dtype
from .solvers import solve, solve_anderson, solve_forward_step

# Defaults and policy, read by the nodes.
TOLERANCE = 1e-4        # RMS per element of Step(x) - x_known: see docs/results.md#tolerance
MAX_ITERATIONS = 100    # per step: see docs/results.md#max-iterations
SOLVER = "anderson"     # fewer model calls than the paper's fixed point: see docs/results.md#solver
REFINE_PASSES = 20      # dpmpp_2m passes after the paper's, until states settle: see docs/results.md#refine-passes
SUBSTEPS = 10           # fine naive sub-steps per interval for the paper's estimate of old_denoised
# a run that will not converge stops here with its best iterates: see docs/results.md#max-model-calls-per-step
MAX_MODEL_CALLS_PER_STEP = 200


def _call_limit(max_model_calls, steps):
    """Model calls a run may make (default MAX_MODEL_CALLS_PER_STEP per step; 0 = no limit)."""
    return MAX_MODEL_CALLS_PER_STEP * steps if max_model_calls is None else max_model_calls


def _budget(model, max_model_calls, steps):
    """`out_of_budget()` for the solvers, True once `model` made `_call_limit` calls; None without a limit."""
    limit = _call_limit(max_model_calls, steps)
    return (lambda: model.calls >= limit) if limit else None


def dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigma, sigma_next):
    """One step of ComfyUI's `sample_dpmpp_2m` (Lu et al. 2022), its exact arithmetic; first order without
    old_denoised or at sigma_next == 0."""
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    h = t_next - t
    ratio = t_next.neg().exp() / t.neg().exp()
    if old_denoised is None or sigma_next == 0:
        return ratio * x - (-h).expm1() * denoised
    r = (t - sigma_prev.log().neg()) / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return ratio * x - (-h).expm1() * denoised_d


@torch.no_grad()
def naive_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Naive DDIM / Euler inversion: what ComfyUI's FlipSigmas + SamplerCustom(euler) computes."""
    sigmas = check_sigmas(sigmas).to(x.device).clone()
    if sigmas[0] == 0:
        sigmas[0] = SIGMA_FLOOR
    model, x = CountedModel(model, extra_args), x.to(work_dtype(x))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i]).to(x.dtype)
        x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        report(callback, i=i, x=x, sigma=sigmas[i + 1], denoised=denoised, model_calls=model.calls)
    return x


@torch.no_grad()
def naive_inversion_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, guided_and_uncond=None):
    """Naive inversion of ComfyUI's CFG++ samplers (Chung et al. 2024): their step x = D_c + sigma * eps_u
    undone, x_up = x + sigma_up * eps_c - sigma * eps_u, both taken at x labelled sigma_up (see
    docs/results.md#cfg-pp-label). guided_and_uncond(model, x, sigma_batch, extra_args) -> (D_c, D_u)."""
    if guided_and_uncond is None:
        raise ValueError("guided_and_uncond: naive_inversion_cfg_pp needs the unconditional prediction")
    sigmas = check_sigmas(sigmas).to(x.device)
    model, x = CountedModel(model, extra_args), x.to(work_dtype(x))
    for i in range(len(sigmas) - 1):
        sigma, sigma_up = sigmas[i], sigmas[i + 1]
        predictions = guided_and_uncond(model, x, sigma_batch(sigma_up, x), extra_args or {})
        guided, uncond = (d.to(x.dtype) for d in predictions)
        x = x + (x - guided) - (x - uncond) * (sigma / sigma_up)
        report(callback, i=i, x=x, sigma=sigma_up, denoised=guided, model_calls=model.calls)
    return x


def _backward_euler(model, x, sigmas, extra_args, callback, step, solver, tolerance, max_iterations,
                    max_model_calls, solver_options):
    """Per step sigma_known -> sigma: solve step(model, x_s, sigma, sigma_known) = x_known from the naive guess."""
    sigmas = check_sigmas(sigmas).to(x.device)
    model, x = CountedModel(model, extra_args), x.to(work_dtype(x))
    options = {**solver_options, "out_of_budget": _budget(model, max_model_calls, len(sigmas) - 1)}
    for i in range(len(sigmas) - 1):
        sigma_known, sigma, x_known = sigmas[i], sigmas[i + 1], x

        def residual(x_s):
            return step(model, x_s, sigma, sigma_known) - x_known

        guess = naive_step(model, x_known, sigma_known, sigma, {})
        x, record = solve(residual, guess, solver, tolerance, max_iterations, options)
        report(callback, i=i, x=x, sigma=sigma, model_calls=model.calls, **record.fields())
    return x


@torch.no_grad()
def exact_inversion_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, solver=SOLVER,
                          tolerance=TOLERANCE, max_iterations=MAX_ITERATIONS, max_model_calls=None, **solver_options):
    """Exact inversion of euler / ddim by backward Euler (Hong et al. 2024, Algorithm 1): per step, solve
    euler_step(x_s, D(x_s, sigma), sigma, sigma_known) = x_known; solver 'fixed_point' (the paper's) or 'anderson'."""
    def euler(counted, x_s, sigma, sigma_known):
        return euler_step(x_s, counted(x_s, sigma).to(x_s.dtype), sigma, sigma_known)
    return _backward_euler(model, x, sigmas, extra_args, callback, euler, solver, tolerance, max_iterations,
                           max_model_calls, solver_options)


@torch.no_grad()
def exact_inversion_one_step(model, x, sigmas, extra_args=None, callback=None, disable=None, step=None,
                             solver=SOLVER, tolerance=TOLERANCE, max_iterations=MAX_ITERATIONS, max_model_calls=None,
                             **solver_options):
    """Backward Euler around a one-step sampler (euler, heun, dpm_2), solving step(x_s, [sigma, sigma_known])
    = x_known with `step(model, x, sigmas, extra_args)` the sampler's own code over two sigmas."""
    if step is None:
        raise ValueError("step: exact_inversion_one_step needs the sampler's one-step function")

    def sampler_step(counted, x_s, sigma, sigma_known):   # counted carries extra_args
        return step(counted, x_s, torch.stack([sigma, sigma_known]), {}).to(x_s.dtype)
    return _backward_euler(model, x, sigmas, extra_args, callback, sampler_step, solver, tolerance,
                           max_iterations, max_model_calls, solver_options)


def _fine_naive_path(model, x, sigma_points):
    """Naive Euler inversion through the given ascending sigmas; returns the state at each."""
    states = [x]
    for a, b in zip(sigma_points[:-1], sigma_points[1:]):
        x = euler_step(x, model(x, a).to(x.dtype), a, b)
        states.append(x)
    return states


def _dpmpp_2m_pass(model, x, sigmas, previous, pass_index, options, callback):
    """One upward pass solving each dpmpp_2m step, old_denoised held at D(previous pass's state two levels up)
    or, in pass 0, at the paper's fine naive estimate. Returns the states at every sigma, x first."""
    n, substeps = len(sigmas) - 1, options["substeps"]
    states = [x]
    for i in range(n):
        sigma_known, sigma, x_known = sigmas[i], sigmas[i + 1], x
        old_denoised, sigma_prev = None, None
        if sigma_known != 0 and i + 1 < n:     # ComfyUI's second-order steps
            sigma_prev = sigmas[i + 2]
        if previous is not None:
            guess = previous[i + 1]
            if sigma_prev is not None:
                old_denoised = model(previous[i + 2], sigma_prev).to(x.dtype)
        elif sigma_prev is None:
            guess = naive_step(model, x_known, sigma_known, sigma, {})
        else:
            logs = torch.stack([sigma_known, sigma, sigma_prev]).log().cpu()
            points = torch.cat([torch.linspace(logs[0], logs[1], substeps + 1)[:-1],  # cpu: moved below
                                torch.linspace(logs[1], logs[2], substeps + 1)]).to(sigmas).exp()  # cpu: to sigmas
            points[0], points[substeps], points[-1] = sigma_known, sigma, sigma_prev
            path = _fine_naive_path(model, x_known, points)
            guess, old_denoised = path[substeps], model(path[-1], sigma_prev).to(x.dtype)

        def residual(x_s):
            denoised = model(x_s, sigma).to(x_s.dtype)
            return dpmpp_2m_step(x_s, denoised, old_denoised, sigma_prev, sigma, sigma_known) - x_known

        x, record = solve(residual, guess, options["solver"], options["tolerance"], options["max_iterations"],
                          options["solver_options"])
        states.append(x)
        report(callback, i=i, x=x, sigma=sigma, model_calls=model.calls, **record.fields(), **{"pass": pass_index})
    return states


@torch.no_grad()
def exact_inversion_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, solver=SOLVER,
                             tolerance=TOLERANCE, max_iterations=MAX_ITERATIONS, substeps=SUBSTEPS,
                             refine_passes=REFINE_PASSES, refine="anderson", max_model_calls=None, **solver_options):
    """Exact inversion of dpmpp_2m by backward Euler with the high-order term held (Hong et al. 2024,
    Algorithm 2), then refine passes (ours) that re-solve each step with old_denoised from the previous
    pass, plainly iterated or Anderson-mixed, until the states move less than `tolerance`."""
    sigmas = check_sigmas(sigmas).to(x.device)
    model, x = CountedModel(model, extra_args), x.to(work_dtype(x))
    out_of_budget = _budget(model, max_model_calls, len(sigmas) - 1)
    options = dict(solver=solver, tolerance=tolerance, max_iterations=max_iterations, substeps=substeps,
                   solver_options={**solver_options, "out_of_budget": out_of_budget})
    passes = [0]

    def run_pass(previous):
        states = _dpmpp_2m_pass(model, x, sigmas, previous, passes[0], options, callback)
        passes[0] += 1
        return torch.stack(states, 1)          # (B, levels, ...)

    states = run_pass(None)
    if refine_passes == 0:
        return states[:, -1]

    def pass_residual(stacked):
        return stacked - run_pass(list(stacked.unbind(1)))

    if refine == "anderson":
        states, _ = solve_anderson(pass_residual, states, tolerance, refine_passes, out_of_budget=out_of_budget)
    elif refine == "plain":
        states, _ = solve_forward_step(pass_residual, states, tolerance, refine_passes, rho=1.0, warmup=1,
                                       out_of_budget=out_of_budget)
    else:
        raise ValueError(f"refine must be 'anderson' or 'plain', got {refine!r}")
    return states[:, -1]

