"""Exact inversion of any deterministic sampler by shooting: Anderson drives N(Sample(x_T)) - N(x) to zero,
N a naive inversion, and the regeneration error Sample(x_T) - x stops each sample and picks its result."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .common import CountedModel, check_sigmas, per_sample_rms, report, select, work_dtype
from .exact import TOLERANCE, _budget, _call_limit, naive_inversion
from .solvers import SampleTracker, solve_anderson

MAX_ITERATIONS = 30        # per run when called directly; the nodes pass their max_iterations input
START_TOLERANCE = 1e-3     # the inversion that starts a run only needs to find the basin
PATIENCE = 12              # Anderson wanders before it gains again; see docs/results.md#patience
GAIN = 0.1                 # the relative fall in regeneration error that resets the patience count
RELATIVE_FLOOR = 1e-5      # float32 rounding of x's RMS: see docs/results.md#relative-floor
SAFEGUARD = 10.0           # an iterate whose regeneration error exceeds this x the run's best is refused
RETRY_ABOVE = 1e-3         # visibly exact, of x's RMS: see docs/results.md#retry-above


@dataclass(frozen=True)
class ShootingRun:
    """One shooting run: Anderson on N(Sample(x_T)) - N(x) with N = `approximate_inverse(model, y, sigmas,
    extra_args)`, from `start(model, x, sigmas, extra_args, tolerance=, max_model_calls=)` (an exact inversion
    of a neighbouring sampler), or from N(x) itself where start is None."""
    approximate_inverse: Callable = naive_inversion
    start: Optional[Callable] = None


@dataclass
class _Shooting:
    """One inversion's state, shared by its runs."""
    model: CountedModel
    x: torch.Tensor
    sigmas: torch.Tensor
    extra_args: dict
    sample: Callable
    callback: Optional[Callable]
    reachable: torch.Tensor          # per sample: the regeneration error that counts as exact
    patience: int
    max_iterations: int
    history: int
    limit: int                       # model calls allowed, 0 = no limit
    out_of_budget: Optional[Callable]
    best: Optional[SampleTracker] = None   # each sample's best iterate over every run
    run: Optional[SampleTracker] = None    # progress within the current run (stop rule, safeguard)
    iteration: int = 0
    targets: dict = field(default_factory=dict)   # N(x) per approximate inverse


def _regenerate(state, z):
    # fresh copies: samplers may write into their schedule (uni_pc) or extra_args (cfg_pp)
    return state.sample(state.model, z.clone(), state.sigmas.flip(0), extra_args=dict(state.extra_args),
                        disable=True).to(state.x.dtype)


def _residual(state, run, active, target, z):
    """N(Sample(z)) - N(x) for the samples still shooting; 0 where a sample is finished, NaN (Anderson then
    restarts it from its best) where z regenerates far worse than the run's best."""
    regenerated = _regenerate(state, z)
    error = per_sample_rms(regenerated - state.x)
    state.best.update(z, error, active)
    if state.run is None:
        state.run = SampleTracker(z, error, GAIN)
    state.run.update(z, error, torch.ones_like(active))
    report(state.callback, i=state.iteration, x=z, sigma=state.sigmas[-1], residual=error,
           hit_cap=state.best.best_residual >= state.reachable, model_calls=state.model.calls)
    state.iteration += 1
    done = ~active | (state.best.best_residual < state.reachable) | (state.run.stale >= state.patience)
    worse = error > SAFEGUARD * state.run.best_residual
    step = run.approximate_inverse(state.model, regenerated, state.sigmas, state.extra_args) - target
    return select(done, torch.zeros_like(z), select(worse, torch.full_like(z, float("nan")), step))


def _shoot(state, run, active):
    """One run for the samples in `active`; the others keep their best iterate."""
    if run.approximate_inverse not in state.targets:   # runs that share a preconditioner share N(x)
        state.targets[run.approximate_inverse] = run.approximate_inverse(state.model, state.x, state.sigmas,
                                                                         state.extra_args)
    target = state.targets[run.approximate_inverse]
    start = target if run.start is None else run.start(   # the start spends the same budget
        state.model, state.x, state.sigmas, state.extra_args, tolerance=START_TOLERANCE,
        max_model_calls=max(state.limit - state.model.calls, 1) if state.limit else 0)
    if state.best is None:
        state.best = SampleTracker(start)
    state.run = None
    # Anderson stops on our verdict alone (a finished sample's residual is exactly 0): a small preconditioned
    # residual is no small regeneration error where N maps several latents close together
    solve_anderson(lambda z: _residual(state, run, active, target, z), select(active, start, state.best.best_x),
                   1e-30, state.max_iterations, history=state.history, out_of_budget=state.out_of_budget)


@torch.no_grad()
def exact_inversion_shooting(model, x, sigmas, extra_args=None, callback=None, disable=None, sample=None,
                             tolerance=TOLERANCE, max_iterations=MAX_ITERATIONS, max_model_calls=None,
                             runs=None, history=5, patience=PATIENCE, **unused_options):
    """Exact inversion of `sample` (k-diffusion signature) over the ASCENDING sigmas: the ShootingRuns in
    `runs` in order, within one model-call budget, a later one only for samples left above RETRY_ABOVE.

    tolerance: RMS per element of Sample(x_T) - x (raised to RELATIVE_FLOOR x the RMS of x). Each iteration
    reports that error as `residual`. Returns each sample's iterate with the lowest regeneration error."""
    if sample is None:
        raise ValueError("sample: exact_inversion_shooting needs the sampler's function")
    if runs is None:
        raise ValueError("runs: exact_inversion_shooting needs its ShootingRuns, e.g. (ShootingRun(naive_inversion, "
                         "exact_inversion_euler), ShootingRun(naive_inversion, None))")
    if not runs or not all(isinstance(run, ShootingRun) for run in runs):
        raise ValueError(f"runs must be a non-empty sequence of ShootingRun, got {runs!r}")
    sigmas = check_sigmas(sigmas).to(x.device)
    # one counter for every call; the sampler gets the caller's extra_args itself (cfg_pp adds hooks to them)
    counted, x = CountedModel(model), x.to(work_dtype(x))
    x_rms, steps = per_sample_rms(x), len(sigmas) - 1
    state = _Shooting(counted, x, sigmas, extra_args or {}, sample, callback,
                      torch.clamp(RELATIVE_FLOOR * x_rms, min=tolerance), patience, max_iterations, history,
                      _call_limit(max_model_calls, steps), _budget(counted, max_model_calls, steps))
    active = torch.ones_like(state.reachable, dtype=torch.bool)
    for k, run in enumerate(runs):
        if k:
            active = state.best.best_residual >= torch.maximum(state.reachable, RETRY_ABOVE * x_rms)
            if not bool(active.any()) or (state.out_of_budget and state.out_of_budget()):
                break
        _shoot(state, run, active)
    return state.best.best_x
