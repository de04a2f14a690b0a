"""Why shooting misses the analytic benchmark's worst cells: which mixture component each latent, and
what each start regenerates, lies nearest to.

For every cell of bench/results/exact_samplers.json that the pack's inverter leaves above -10 dB, this
regenerates the cell's latent x0 (the benchmark's own model, schedule and noise), finds the sample that
misses, and prints the cond mixture's component nearest to x0 and to what the sampler regenerates from
each of shooting's starts (the exact euler, heun and dpm_2 inversions at the start tolerance, and N(x)) and
from the iterate shooting returns. A start whose regeneration sits at another component lies in another basin.
Two checks that the sampler itself is not the limit: how far a one-ulp change of the noise moves its
output, and how many eigenvalues of the preconditioned Jacobian J_N J_S at the true noise lie outside the
unit disc around 1 (where plain fixed-point iteration would diverge), by central differences in float64.

`$COMFY_PYTHON -m tools.shooting_basins` from the repository root after `eval "$(bash tools/provision.sh)"`.
"""
import json
import os
import tempfile

import torch

from bench.common import RESULTS
from bench.exact.analytic import schedules
from bench.exact.samplers import comfy_model_sampling
from inversion_ops import exact, multistep
from tests.support.analytic import AnalyticCFG
from tests.support.comfy_runtime import InProcessComfy
from tests.support.metrics import nmse_db

MISSED_ABOVE_DB = -10.0


def nearest_component(model, latents):
    """Index of, and distance to, the cond mixture's nearest component mean, per sample."""
    distances = torch.cdist(latents.flatten(1).double(), model.cond.means.flatten(1))
    return distances.argmin(1).tolist(), distances.min(1).values.tolist()


def sampler_checks(regenerate, naive, noise):
    """(NMSE in dB of the output after a one-ulp relative change of the noise, number of eigenvalues of
    J_N J_S with |1 - lambda| > 1, the dtype the differences ran in) for one sample's noise (1, ...)."""
    x0 = regenerate(noise)
    nudged = noise * (1 + 2.0 ** -24 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(100)))
    ulp_db = float(nmse_db(regenerate(nudged), x0))
    try:
        z, relative_step = noise.double(), 1e-6
        y = regenerate(z)
    except RuntimeError:   # uni_pc mixes its float32 coefficients into a float64 latent
        z, relative_step = noise, 1e-3
        y = regenerate(z)
    n, h = z.numel(), relative_step * float(z.abs().mean())
    j_s, j_n = torch.zeros(n, n, dtype=z.dtype), torch.zeros(n, n, dtype=z.dtype)
    for k in range(n):
        e = torch.zeros(n, dtype=z.dtype)
        e[k] = h
        e = e.view_as(z)
        j_s[:, k] = ((regenerate(z + e) - regenerate(z - e)) / (2 * h)).flatten()
        j_n[:, k] = ((naive(y + e) - naive(y - e)) / (2 * h)).flatten()
    eigenvalues = torch.linalg.eigvals((j_n @ j_s).double())
    return ulp_db, int(((1 - eigenvalues).abs() > 1).sum()), str(z.dtype).removeprefix("torch.")


def start_name(run):
    if run.start is None:
        return "N(x)"
    step = getattr(run.start, "keywords", {}).get("step")
    return f"{step.__name__.removeprefix('one_step_') if step else run.start.__name__.removeprefix('exact_inversion_')} start"


def main():
    cells = json.load(open(os.path.join(RESULTS, "exact_samplers.json")))["rows"]
    missed = [r for r in cells if r["method"] == "pack" and r["regen_nmse_db"] > MISSED_ABOVE_DB]
    runtime = InProcessComfy(tempfile.mkdtemp())
    torch.set_num_threads(1)
    inverses = runtime.pack_module("nodes.inverses")
    crossed = 0
    for cell in missed:
        kind = cell["model"].removeprefix("analytic_")
        sigmas = schedules(cell["steps"])[kind]
        model = AnalyticCFG(kind, cell["cfg"], comfy_model_sampling(kind))
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]   # as the benchmark
        sample = inverses.comfy_sampler_function(cell["sampler"])

        def regenerate(z):
            return sample(model, z.clone(), sigmas.clone(), extra_args={}, disable=True)
        x0 = regenerate(noise)
        inverted = inverses.EXACT_INVERSIONS[inverses.check_invertible_sampler(cell["sampler"])](model, x0, sigmas.flip(0))
        b = int(nmse_db(regenerate(inverted), x0).argmax())   # the sample that misses
        starts = {start_name(run): run.approximate_inverse(model, x0, sigmas.flip(0), {}) if run.start is None else
                  run.start(model, x0, sigmas.flip(0), {}, tolerance=multistep.START_TOLERANCE) for run in inverses.SHOOTING_RUNS}
        starts["returned"] = inverted
        target, target_distance = nearest_component(model, x0[b:b + 1])
        line = f"{cell['model']} {cell['sampler']} {cell['steps']} steps cfg {cell['cfg']:g}: x0 -> component {target[0]} ({target_distance[0]:.1f})"
        other_basin = True
        for name, z in starts.items():
            regenerated = regenerate(z[b:b + 1])
            component, distance = nearest_component(model, regenerated)
            error = float(nmse_db(regenerated, x0[b:b + 1]))
            line += f"; {name} regenerates at component {component[0]} ({distance[0]:.1f}), {error:+.1f} dB"
            if name != "returned" and component[0] == target[0]:
                other_basin = False
        crossed += other_basin
        ulp_db, outside, dtype = sampler_checks(
            lambda z: sample(model, z.clone(), sigmas.to(z.dtype), extra_args={}, disable=True),
            lambda y: exact.naive_inversion(model, y, sigmas.flip(0).to(y.dtype)), noise[b:b + 1])
        line += f"; one-ulp noise change: {ulp_db:.1f} dB; eigenvalues of J_N J_S off the unit disc around 1: {outside} ({dtype})"
        print(line, flush=True)
    print(f"\n{crossed} of {len(missed)} cells above {MISSED_ABOVE_DB:g} dB: every start regenerates at another component than x0")


if __name__ == "__main__":
    main()
