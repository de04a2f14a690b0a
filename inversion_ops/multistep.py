"""Exact inversion of any deterministic sampler, using the sampler's own code as a black box: a
shooting method on the whole trajectory, preconditioned by naive inversion.

Find x_T with Sample(x_T) = x, where Sample is the very function that regenerates (lms, deis,
ipndm, uni_pc, res_multistep, dpmpp_2m, heunpp2, the cfg_pp variants, ...). Naive inversion N is
an approximate inverse of Sample, so Anderson mixing drives N(Sample(x_T)) - N(x) to zero. The first
run starts from the exact inversion of a neighbouring sampler (euler: the same ODE, so the start lies
in the right basin; from N(x) some runs at cfg 5 settled in another); samples it leaves above -60 dB
run again from another start or with another N (ShootingRun), within the same budget. Each iteration
costs one sampling run and one naive inversion. The regeneration error Sample(x_T) - x stops each run
and picks the returned iterate, so a preconditioned root that does not regenerate is never reported
as converged.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .common import CountedModel, check_sigmas, per_sample_rms, report, select, work_dtype
from .exact import TOLERANCE, _budget, _call_limit, exact_inversion_euler, naive_inversion
from .solvers import solve_anderson

MAX_ITERATIONS = 30        # shooting iterations when called directly; the nodes pass their max_iterations input
START_TOLERANCE = 1e-3     # the euler inversion that starts the run only needs to find the basin
# A sample stops once its regeneration error has not fallen 10% in this many iterations. Anderson wanders
# for a while before it gains again: at 8 a 10-step dpmpp_2m run on the analytic EPS model at cfg 5 stopped
# at -55 dB, at 12 it reached -100 dB. On the tiny random-weight models at cfg 5 the error levels off
# (1e-4 EPS, 1e-3 flow) and the last 12 iterations only spend the budget.
PATIENCE = 12
# Below this fraction of the latent's RMS a regeneration error is float32 rounding (about 100 ulp: ten
# cfg-amplified steps); EPS latents of RMS ~30 level off at 1e-4 on the tiny models.
RELATIVE_FLOOR = 1e-5
SAFEGUARD = 10.0           # an iterate whose regeneration error exceeds this x the best is refused
# A later run is for samples the earlier ones leave above this fraction of the latent's RMS (-60 dB
# NMSE). Below it a sample is visibly exact: on the tiny random-weight flow model shooting levels off near
# -70 dB, and a second run there doubled the model calls (tools/sampler_table.py) and gained nothing.
RETRY_ABOVE = 1e-3


@dataclass(frozen=True)
class ShootingRun:
    """One shooting run: Anderson on N(Sample(x_T)) - N(x) with N = `approximate_inverse(model, y, sigmas,
    extra_args)`, from `start(model, x, sigmas, extra_args, tolerance=, max_model_calls=)` (an exact inversion
    of a neighbouring sampler), or from N(x) itself where start is None."""
    approximate_inverse: Callable = naive_inversion
    start: Optional[Callable] = None


# From the exact euler inversion, then, for the samples left above RETRY_ABOVE, from N(x): from the euler
# start some high-order samplers at 10-20 steps and cfg >= 5 settle far from x (lms, ipndm, uni_pc,
# gradient_estimation on the analytic mixture) and not from N(x).
RUNS = (ShootingRun(naive_inversion, exact_inversion_euler), ShootingRun(naive_inversion, None))


@torch.no_grad()
def exact_inversion_shooting(model, x, sigmas, extra_args=None, callback=None, disable=None, sample=None,
                             tolerance=TOLERANCE, max_iterations=MAX_ITERATIONS, max_model_calls=None,
                             runs=RUNS, history=5, patience=PATIENCE, **unused_options):
    """Exact inversion of `sample` (k-diffusion signature) over the ASCENDING `sigmas`.

    tolerance: RMS per element of Sample(x_T) - x, the regeneration error (raised to RELATIVE_FLOOR x the
    RMS of x, where float32 rounding sits). runs: ShootingRuns in order, all within one model-call budget;
    a run after the first is for the samples the earlier ones left above RETRY_ABOVE. max_iterations: per
    run. Each iteration reports `residual` (the regeneration error per sample), `hit_cap` (not yet within
    tolerance), `i` (the iteration, counted on over every run) and `model_calls`. Returns each sample's
    iterate with the lowest regeneration error.
    """
    if sample is None:
        raise ValueError("sample: exact_inversion_shooting needs the sampler's function")
    if not runs or not all(isinstance(run, ShootingRun) for run in runs):
        raise ValueError(f"runs must be a non-empty sequence of ShootingRun, got {runs!r}")
    sigmas = check_sigmas(sigmas).to(x.device)
    forward_sigmas = sigmas.flip(0)
    extra_args = extra_args or {}
    # one counter for every call; the sampler gets the caller's extra_args itself, since some samplers
    # add hooks to model_options (cfg_pp) and the rest (patches) must stay
    counted, x = CountedModel(model), x.to(work_dtype(x))
    out_of_budget = _budget(counted, max_model_calls, len(sigmas) - 1)
    limit = _call_limit(max_model_calls, len(sigmas) - 1)

    def regenerate(z):
        # fresh copies: samplers may write into their schedule (uni_pc) or extra_args (cfg_pp)
        return sample(counted, z.clone(), forward_sigmas.clone(), extra_args=dict(extra_args), disable=True).to(x.dtype)

    x_rms = per_sample_rms(x)
    reachable = torch.clamp(RELATIVE_FLOOR * x_rms, min=tolerance)
    best = {"z": None, "error": torch.full_like(reachable, float("inf")), "iteration": 0}
    targets = {}

    def shoot(run, active):
        """One run for the samples in `active`; the others stay as they are. Progress (the stop rule and
        the safeguard) is measured within this run, the best iterate over every run."""
        def naive(y):
            return run.approximate_inverse(counted, y, sigmas, extra_args)

        if run.approximate_inverse not in targets:   # runs that share a preconditioner share N(x)
            targets[run.approximate_inverse] = naive(x)
        target = targets[run.approximate_inverse]
        start = target if run.start is None else run.start(   # the start spends the same budget
            counted, x, sigmas, extra_args, tolerance=START_TOLERANCE,
            max_model_calls=max(limit - counted.calls, 1) if limit else 0)
        if best["z"] is None:
            best["z"] = start
        z = select(active, start, best["z"])
        progress = {}

        def residual(z):
            regenerated = regenerate(z)
            error = per_sample_rms(regenerated - x)
            better = active & (error < best["error"])
            best["z"], best["error"] = select(better, z, best["z"]), torch.where(better, error, best["error"])
            if not progress:
                progress.update(error=error, mark=error, stale=torch.zeros_like(error, dtype=torch.long))
            progress["error"] = torch.minimum(error, progress["error"])
            gained = progress["error"] < 0.9 * progress["mark"]
            progress["mark"] = torch.where(gained, progress["error"], progress["mark"])
            progress["stale"] = torch.where(gained, 0, progress["stale"] + 1)
            report(callback, i=best["iteration"], x=z, sigma=sigmas[-1], residual=error,
                   hit_cap=best["error"] >= reachable, model_calls=counted.calls)
            best["iteration"] += 1
            # a sample that regenerates, or whose error has levelled off, is finished; an iterate that
            # regenerates far worse than this run's best is refused (a NaN residual: Anderson restarts that
            # sample from its best iterate, more cautiously), since N can map it close to N(x) all the same
            done = ~active | (best["error"] < reachable) | (progress["stale"] >= patience)
            worse = error > SAFEGUARD * progress["error"]
            step = select(worse, torch.full_like(z, float("nan")), naive(regenerated) - target)
            return select(done, torch.zeros_like(z), step)

        # Anderson stops on our verdict alone (a finished sample's residual is exactly 0): a small preconditioned
        # residual does not mean a small regeneration error where N maps several latents close together
        solve_anderson(residual, z, 1e-30, max_iterations, history=history, out_of_budget=out_of_budget)

    active = torch.ones_like(reachable, dtype=torch.bool)
    for k, run in enumerate(runs):
        if k:
            active = best["error"] >= torch.maximum(reachable, RETRY_ABOVE * x_rms)
            if not bool(active.any()) or (out_of_budget and out_of_budget()):
                break
        shoot(run, active)
    return best["z"]
