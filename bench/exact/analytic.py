"""Exact (backward Euler) vs naive inversion of euler and dpmpp_2m on the closed-form Gaussian mixture.

run(quick) -> list of rows {model, sampler, steps, cfg, method, noise_nmse_db, regen_nmse_db,
model_calls, seconds}: generate x0 from known noise x_T with ComfyUI's sampler arithmetic,
invert, report NMSE(x_T_hat, x_T) and NMSE(regenerated x0, x0) in dB (mean over 2 samples),
CFG model calls and wall time of the inversion only. Models: EPS with a karras schedule
(sigma 0.0292 .. 14.61), flow with a shift-3 schedule from exactly 1.0; 4x8x8 latents in float32
as ComfyUI holds them, so the per-element residual tolerance is 1e-4 (float32 rounding of
x ~ 15 is ~1e-6 per element; the authors' summed 1e-3 on 4x64x64 is ~2.5e-4 per element).
CFG mixes two mixtures with the same components and different weights (cfg_denoiser).
Methods: naive (FlipSigmas + euler), exact_fixed_point (the paper's solver; for dpmpp_2m the
paper's single pass), exact_anderson (Anderson mixing; dpmpp_2m: single pass), and for dpmpp_2m
exact_anderson_refined (plus up to REFINE_PASSES Anderson-mixed refine passes). Solvers run with
up to MAX_ITERATIONS iterations per step. `python -m bench.exact.analytic [--quick]` prints a
markdown table.
"""
import sys
import time

import torch

from bench.common import markdown_table
from inversion_ops import exact
from inversion_ops.common import StepLog
from tests.support.analytic import GaussianMixtureDenoiser, cfg_denoiser
from tests.support.metrics import nmse_db
from tests.support.reference_samplers import sample_dpmpp_2m, sample_euler
from tests.support.schedules import flow_sigmas, karras_sigmas

COLUMNS = ("model", "sampler", "steps", "cfg", "method", "noise_nmse_db", "regen_nmse_db",
           "model_calls", "seconds")
TOL = 1e-4
MAX_ITERATIONS = 500   # per step (the solvers' cap when this bench was written)
REFINE_PASSES = 4      # dpmpp_2m exact_anderson_refined (the function's default when this bench was written)


def schedules(steps):
    """The analytic benchmark's schedules, float32 as ComfyUI holds them: karras for EPS, shift-3 flow from 1.0."""
    return {"eps": karras_sigmas(steps).float(), "flow": flow_sigmas(steps).float()}


def methods(sampler):
    """method -> fn(model, x, sigmas, callback=...) in k-diffusion's shape, returning x_T."""
    invert = exact.exact_inversion_euler if sampler == "euler" else exact.exact_inversion_dpmpp_2m
    single_pass = {} if sampler == "euler" else {"refine_passes": 0}
    common = dict(tolerance=TOL, max_iterations=MAX_ITERATIONS)
    out = {
        "naive": exact.naive_inversion,
        "exact_fixed_point": lambda d, x, s, **kw: invert(d, x, s, solver="fixed_point", **common, **single_pass, **kw),
        "exact_anderson": lambda d, x, s, **kw: invert(d, x, s, solver="anderson", **common, **single_pass, **kw),
    }
    if sampler == "dpmpp_2m":
        out["exact_anderson_refined"] = lambda d, x, s, **kw: invert(d, x, s, solver="anderson", **common,
                                                                       refine_passes=REFINE_PASSES, **kw)
    return out


def run(quick=False):
    torch.set_num_threads(1)   # tiny tensors: threads only contend
    grid = ([("euler", 10), ("dpmpp_2m", 10)] if quick
            else [("euler", 10), ("euler", 50), ("dpmpp_2m", 10), ("dpmpp_2m", 20)])
    cfgs = (1.0, 5.0) if quick else (1.0, 3.0, 5.0, 7.5)
    rows = []
    for model in ("eps", "flow"):
        cond = GaussianMixtureDenoiser.random(parameterization=model, weights=[0.6, 0.3, 0.1])
        uncond = GaussianMixtureDenoiser.random(parameterization=model, weights=[0.2, 0.3, 0.5])
        for sampler, steps in grid:
            sigmas = schedules(steps)[model]
            sample = sample_euler if sampler == "euler" else sample_dpmpp_2m
            noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
            for cfg in cfgs:
                denoise = cfg_denoiser(cond, uncond, cfg)
                image = sample(denoise, noise, sigmas)
                for method, invert in methods(sampler).items():
                    log = StepLog()
                    start = time.perf_counter()
                    recovered = invert(denoise, image, sigmas.flip(0), callback=log)
                    seconds = time.perf_counter() - start
                    regenerated = sample(denoise, recovered, sigmas)
                    rows.append(dict(
                        model=model, sampler=sampler, steps=steps, cfg=cfg, method=method,
                        noise_nmse_db=round(float(nmse_db(recovered, noise).mean()), 1),
                        regen_nmse_db=round(float(nmse_db(regenerated, image).mean()), 1),
                        model_calls=log.model_calls, seconds=round(seconds, 2)))
    return rows


if __name__ == "__main__":
    print(markdown_table(run(quick="--quick" in sys.argv), COLUMNS, floatfmt="{}"))
