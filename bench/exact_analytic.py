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
up to MAX_ITERATIONS iterations per step. `python bench/exact_analytic.py [--quick]` prints a
markdown table.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inversion_ops import exact  # noqa: E402
from inversion_ops.common import StepLog  # noqa: E402
from tests.support.analytic import GaussianMixtureDenoiser, cfg_denoiser  # noqa: E402
from tests.support.metrics import nmse_db  # noqa: E402
from tests.support.reference_samplers import sample_dpmpp_2m, sample_euler  # noqa: E402

COLUMNS = ("model", "sampler", "steps", "cfg", "method", "noise_nmse_db", "regen_nmse_db",
           "model_calls", "seconds")
TOL = 1e-4
MAX_ITERATIONS = 500   # per step (the solvers' cap when this bench was written)
REFINE_PASSES = 4      # dpmpp_2m exact_anderson_refined (the function's default when this bench was written)


def karras_sigmas(steps, sigma_min=0.0292, sigma_max=14.6146, rho=7.0):
    """ComfyUI's karras schedule for an SD1.5-like EPS model, descending, ending at 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


def flow_sigmas(steps, shift=3.0):
    """SD3-style shifted flow schedule, descending from exactly 1.0 to 0."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


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
            sigmas = karras_sigmas(steps) if model == "eps" else flow_sigmas(steps)
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


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
