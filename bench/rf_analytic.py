"""RF-Inversion on the closed-form flow Gaussian-mixture model: exact model, CPU, seconds.

run(quick) -> list of row dicts, three parts:
  roundtrip  gamma = 0 forward vs plain ODE inversion (`plain_ode_inversion` below), and
             image -> noise -> image NMSE (eta = 0)
  noise      inverted-noise statistics for typical and atypical inputs over gamma, and the
             reconstruction (same model) with eta = 0 and with eta 0.9 on the first quarter
  eta        distance to the reference latent of the output of another mixture (the "edit
             prompt") over eta, controller on the first quarter of the steps or on all
`python -m bench.rf_analytic [--quick]` prints one markdown table per part.
"""
import sys
import time

import torch

from tests.support.schedules import flow_sigmas
from inversion_ops.common import SIGMA_FLOOR, CountedModel, StepLog, check_sigmas, to_d
from inversion_ops.rf import controlled_forward, controlled_reverse
from tests.support.analytic import GaussianMixtureDenoiser
from tests.support.metrics import nmse_db

GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def flow_schedule(steps, shift=1.0):
    """Ascending float32 flow sigmas 0 -> 1 (exactly), with SD3/Flux-style time shift."""
    return flow_sigmas(steps, shift, dtype=torch.float32, ascending=True)


def plain_ode_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, sigma_floor=SIGMA_FLOOR):
    """Plain rectified-flow ODE inversion, the gamma = 0 baseline, written independently of
    inversion_ops.rf: forward Euler up the ascending sigmas, x += u * dsigma with the velocity
    u = (x - D)/sigma, the model evaluated at max(sigma, sigma_floor) (sigma = 0 carries no velocity)."""
    sigmas = check_sigmas(sigmas, unit_interval=True).to(x.device)
    model = CountedModel(model, extra_args)
    for i in range(len(sigmas) - 1):
        sigma_eval = sigmas[i].clamp_min(sigma_floor)
        denoised = model(x, sigma_eval).to(x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_eval, "denoised": denoised,
                      "model_calls": model.calls})
        x = x + to_d(x, sigma_eval, denoised) * (sigmas[i + 1] - sigmas[i])  # sample_euler's arithmetic
    return x


def inputs(model, shape, n, seed=1):
    """Typical samples of the model, a flat colour and a checkerboard latent (n rows each)."""
    typical = model.sample(n, generator=torch.Generator().manual_seed(seed)).float()
    colour = torch.tensor([0.8, -0.4, 0.3, 0.1][: shape[0]] + [0.0] * max(shape[0] - 4, 0))
    flat = colour.view(1, -1, 1, 1).expand(n, *shape).clone()
    yy, xx = torch.meshgrid(torch.arange(shape[1]), torch.arange(shape[2]), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float().expand(n, *shape).clone()
    return {"typical": typical, "flat colour": flat, "checkerboard": checker}


def moments(x):
    """Mean, std and kurtosis (Pearson, 3 for a Gaussian) over each sample, averaged over the batch."""
    f = x.double().flatten(1)
    mean, std = f.mean(1), f.std(1)
    kurt = ((f - mean[:, None]) / std[:, None]).pow(4).mean(1)
    return mean.mean().item(), std.mean().item(), kurt.mean().item()


def run(quick: bool = False) -> list:
    shape = (4, 8, 8) if quick else (4, 16, 16)
    steps, n = (12, 2) if quick else (28, 4)
    model = GaussianMixtureDenoiser.random(shape=shape, components=3, seed=0, parameterization="flow")
    edit = GaussianMixtureDenoiser.random(shape=shape, components=3, seed=5, parameterization="flow")
    data = inputs(model, shape, n)
    rows = []

    for shift in (1.0, 3.0):
        up = flow_schedule(steps, shift)
        down = up.flip(0)
        for name, x0 in data.items():
            t0 = time.perf_counter()
            log = StepLog()
            plain = plain_ode_inversion(model, x0, up)
            ctrl = controlled_forward(model, x0, up, callback=log, gamma=0.0, seed=0)
            back = controlled_reverse(model, ctrl, down, reference=x0, eta=0.0)
            rows.append({"part": "roundtrip", "input": name, "shift": shift, "steps": steps,
                         "gamma0_vs_plain_max_abs": (ctrl - plain).abs().max().item(),
                         "roundtrip_nmse_db": nmse_db(back, x0).mean().item(),
                         "model_calls": 2 * log.model_calls,
                         "seconds": time.perf_counter() - t0})

    up, down = flow_schedule(steps), flow_schedule(steps).flip(0)
    for name, x0 in data.items():
        for gamma in GAMMAS:
            noise = controlled_forward(model, x0, up, gamma=gamma, seed=0)
            back = controlled_reverse(model, noise, down, reference=x0, eta=0.0)
            guided = controlled_reverse(model, noise, down, reference=x0, eta=0.9, start=0.0, stop=0.25)
            mean, std, kurt = moments(noise)
            rows.append({"part": "noise", "input": name, "gamma": gamma, "mean": mean, "std": std,
                         "kurtosis": kurt, "eta0_recon_nmse_db": nmse_db(back, x0).mean().item(),
                         "eta0.9_stop0.25_recon_nmse_db": nmse_db(guided, x0).mean().item()})

    y0 = data["typical"]
    noise = controlled_forward(model, y0, up, gamma=0.5, seed=0)
    for stop in (0.25, 1.0):
        for eta in ETAS:
            out = controlled_reverse(edit, noise, down, reference=y0, eta=eta, start=0.0, stop=stop)
            rows.append({"part": "eta", "reverse_model": "edit mixture", "gamma": 0.5, "stop": stop,
                         "eta": eta, "rms_to_reference": (out - y0).flatten(1).pow(2).mean(1).sqrt().mean().item(),
                         "nmse_to_reference_db": nmse_db(out, y0).mean().item()})
    return rows


def markdown(rows):
    out = []
    for part in dict.fromkeys(r["part"] for r in rows):
        sel = [r for r in rows if r["part"] == part]
        keys = [k for k in sel[0] if k != "part"]
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        out += [f"### {part}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        out += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in sel]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("RF-Inversion, analytic flow Gaussian-mixture model, CPU\n")
    print(markdown(run(quick="--quick" in sys.argv)))
