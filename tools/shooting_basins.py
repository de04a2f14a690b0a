"""Why shooting misses the analytic benchmark's worst cells: which mixture component each latent, and
what each start regenerates, lies nearest to.

For every cell of bench/results/exact_samplers.json that the pack's inverter leaves above -10 dB, this
regenerates the cell's latent x0 (the benchmark's own model, schedule and noise), finds the sample that
misses, and prints the cond mixture's component nearest to x0 and to what the sampler regenerates from
each of shooting's starts (the exact euler inversion at the start tolerance, and N(x)) and from the
iterate shooting returns. A start whose regeneration sits at another component lies in another basin.

`$COMFY_PYTHON tools/shooting_basins.py` after `eval "$(bash tools/provision.sh)"`.
"""
import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench")]
from exact_samplers import comfy_model_sampling, schedules  # noqa: E402
from inversion_ops import exact, multistep  # noqa: E402
from tests.support.analytic import AnalyticCFG  # noqa: E402
from tests.support.comfy_runtime import InProcessComfy  # noqa: E402
from tests.support.metrics import nmse_db  # noqa: E402

MISSED_ABOVE_DB = -10.0


def nearest_component(model, latents):
    """Index of, and distance to, the cond mixture's nearest component mean, per sample."""
    distances = torch.cdist(latents.flatten(1).double(), model.cond.means.flatten(1))
    return distances.argmin(1).tolist(), distances.min(1).values.tolist()


def main():
    cells = json.load(open(os.path.join(REPO, "bench", "results", "exact_samplers.json")))["rows"]
    missed = [r for r in cells if r["method"] == "pack" and r["regen_nmse_db"] > MISSED_ABOVE_DB]
    runtime = InProcessComfy(tempfile.mkdtemp())
    torch.set_num_threads(1)
    exact_nodes, sampling = runtime.pack_module("nodes.exact"), runtime.pack_module("nodes.sampling")
    crossed = 0
    for cell in missed:
        kind = cell["model"].removeprefix("analytic_")
        sigmas = schedules(cell["steps"])[kind]
        model = AnalyticCFG(kind, cell["cfg"], comfy_model_sampling(kind))
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]   # as the benchmark
        sample = exact_nodes.comfy_sampler_function(cell["sampler"])

        def regenerate(z):
            return sample(model, z.clone(), sigmas.clone(), extra_args={}, disable=True)
        x0 = regenerate(noise)
        inverted = exact_nodes.EXACT_INVERSIONS[sampling.check_invertible_sampler(cell["sampler"])](model, x0, sigmas.flip(0))
        b = int(nmse_db(regenerate(inverted), x0).argmax())   # the sample that misses
        starts = {"euler start": exact.exact_inversion_euler(model, x0, sigmas.flip(0), tolerance=multistep.START_TOLERANCE),
                  "N(x)": exact.naive_inversion(model, x0, sigmas.flip(0)), "returned": inverted}
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
        print(line, flush=True)
    print(f"\n{crossed} of {len(missed)} cells above {MISSED_ABOVE_DB:g} dB: both starts regenerate at another component than x0")


if __name__ == "__main__":
    main()
