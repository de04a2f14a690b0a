"""PreciseInv vs naive (and exact backward-Euler) inversion on the closed-form Gaussian mixture.

run(quick) -> list of rows {model, steps, cfg, method, recon_nmse_db, model_calls_forward,
model_calls_backward, seconds}: invert x0 along the schedule, regenerate with ComfyUI's Euler
arithmetic (same denoiser, same cfg), NMSE to x0 in dB (mean over samples). Models: EPS with the
SD1.5 "simple" schedule (sigma_max 14.6), flow with a shift-3 schedule ending at sigma = 1.
CFG 3 mixes two mixtures with the same components and different weights (cfg_denoiser).
Methods: naive (DDIM inversion as the paper's baseline, bench/common.ddim_inversion), PreciseInv at the paper's
eta 1e-2 and 1e-5 (tolerance sqrt(eta) on the step residual's RMS), exact backward Euler (Anderson,
tolerance sqrt(1e-5)). `python -m bench.preciseinv_analytic [--quick]` prints a markdown table.
"""
import sys
import time

import torch

from bench.common import ddim_inversion, sd15_simple_sigmas
from tests.support.schedules import flow_sigmas
from inversion_ops.common import StepLog, euler_step
from inversion_ops.exact import exact_inversion_euler
from inversion_ops.preciseinv import preciseinv
from tests.support.analytic import GaussianMixtureDenoiser, cfg_denoiser
from tests.support.metrics import nmse_db

COLUMNS = ("model", "steps", "cfg", "method", "recon_nmse_db", "model_calls_forward",
           "model_calls_backward", "seconds")
EXACT_MAX_ITERATIONS = 500   # per step, the cap this bench's exact rows have always used
SCHEDULES = {   # ascending, as python floats
    "eps": lambda steps: sd15_simple_sigmas(steps).flip(0).tolist(),
    "flow": lambda steps: flow_sigmas(steps, ascending=True).tolist(),
}


def sample_euler(denoise, x, sigmas_descending):
    """ComfyUI's sample_euler arithmetic (x + d * dt)."""
    for s, s_next in zip(sigmas_descending[:-1], sigmas_descending[1:]):
        x = euler_step(x, denoise(x, torch.full((x.shape[0],), s)), s, s_next)
    return x


def methods():
    """name -> run(model, x0, sigmas) -> (x_T, forward model calls, backward model calls)."""
    def run_naive(d, x, s):
        log = StepLog()
        x_T = ddim_inversion(d, x, s, callback=log)
        return x_T, log.model_calls, 0
    out = {"naive": run_naive}
    for eta in (1e-2, 1e-5):
        def run_pi(d, x, s, eta=eta):   # the paper's eta bounds the step MSE: tolerance sqrt(eta) on its RMS
            log = StepLog()
            x_T = preciseinv(d, x, s, callback=log, tolerance=eta ** 0.5)
            return x_T, log.model_calls, log.model_calls_backward
        out[f"preciseinv eta {eta:g}"] = run_pi

    def run_exact(d, x, s):   # RMS tolerance sqrt(1e-5) = PreciseInv's eta 1e-5 as an MSE
        log = StepLog()
        x_T = exact_inversion_euler(d, x, torch.tensor(s, dtype=torch.float64), callback=log,
                                    tolerance=1e-5 ** 0.5, max_iterations=EXACT_MAX_ITERATIONS)
        return x_T, log.model_calls, 0
    out["backward euler (anderson)"] = run_exact
    return out


def run(quick: bool = False) -> list:
    shape, n = ((4, 4, 4), 2) if quick else ((4, 8, 8), 4)
    rows = []
    for model_name, schedule in SCHEDULES.items():
        cond = GaussianMixtureDenoiser.random(shape, 3, seed=0, parameterization=model_name, weights=[0.6, 0.3, 0.1])
        uncond = GaussianMixtureDenoiser.random(shape, 3, seed=0, parameterization=model_name, weights=[0.2, 0.3, 0.5])
        x0 = cond.sample(n, torch.Generator().manual_seed(1)).float()
        for cfg in (1.0, 3.0):
            denoise = cond if cfg == 1.0 else cfg_denoiser(cond, uncond, cfg)
            for steps in (2, 4, 10):
                sigmas = schedule(steps)
                for name, method in methods().items():
                    t0 = time.perf_counter()
                    x_T, forward, backward = method(denoise, x0, sigmas)
                    seconds = time.perf_counter() - t0
                    recon = sample_euler(denoise, x_T.float(), sigmas[::-1])
                    rows.append({"model": model_name, "steps": steps, "cfg": cfg, "method": name,
                                 "recon_nmse_db": nmse_db(recon, x0).mean().item(),
                                 "model_calls_forward": forward, "model_calls_backward": backward,
                                 "seconds": seconds})
    return rows


def markdown(rows):
    fmt = {"recon_nmse_db": "{:.1f}", "seconds": "{:.2f}", "cfg": "{:g}"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
