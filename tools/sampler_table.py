"""The README's sampler decision table: every invertible ComfyUI sampler at 10 steps, cfg 5 on the tiny
random-weight SD3-layout model (flow, and the same model sampled as EPS), through Invert Latent with its
defaults. Generates x0 from seeded noise with ComfyUI's own sampler, inverts, regenerates from the inverted
latent (Inverted Noise), and prints markdown rows: regenerated NMSE (dB) and model calls per step. Also
dpmpp_2m on the tiny SD1.5 layout: the paper's algorithm against shooting.

`$COMFY_PYTHON -m tools.sampler_table` from the repository root after `eval "$(bash tools/provision.sh)"`.
"""
import tempfile

import torch

from bench.common import conditioning
from tests.support.comfy_runtime import InProcessComfy
from tests.support.metrics import nmse_db

SAMPLERS = ["euler", "ddim", "heun", "dpm_2", "heunpp2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "deis", "ipndm",
            "ipndm_v", "uni_pc", "uni_pc_bh2", "res_multistep", "gradient_estimation", "euler_cfg_pp",
            "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"]


def main():
    runtime = InProcessComfy(tempfile.mkdtemp())
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    torch.set_num_threads(1)
    sampling, exact_nodes = runtime.pack_module("nodes.sampling"), runtime.pack_module("nodes.exact")
    flow = runtime.nodes.UNETLoader().load_unet("tiny_sd3_flow.safetensors", "default")[0]
    models = {"flow": (flow, "simple"), "eps": (ModelSamplingDiscrete().patch(flow, "eps", False)[0], "karras")}
    positive, negative = (conditioning(4096, 2048, seed, pooled_first=False) for seed in (1, 2))
    cells = {}
    for kind, (model, scheduler) in models.items():
        for name in SAMPLERS:
            # per sampler: ComfyUI's uni_pc writes 0.001 over the last sigma of the schedule it is given
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 10).cpu()
            noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
            sampler = comfy.samplers.sampler_object(name)
            with torch.inference_mode():
                image = sampling.run_sampler(model, positive, negative, 5.0, {"samples": torch.zeros(1, 16, 8, 8)},
                                             sampler, sigmas, noise=noise, seed=7)
                out = exact_nodes.InvertLatent.execute(
                    model=model, positive=positive, negative=negative, latent=image, sampler_name=name,
                    scheduler=scheduler, steps=10, cfg=5.0, method="exact", max_iterations=100, tolerance=1e-4,
                    denoise=1.0)
                inverted = out.result[0]
                start = sampling.InvertedNoise(model, inverted["samples"]).generate_noise(inverted)
                regen = sampling.run_sampler(model, positive, negative, 5.0, inverted, sampler, sigmas, noise=start)
            cells[kind, name] = (float(nmse_db(regen["samples"], image["samples"])), out.ui["model_calls"][0] / 10)
            print(f"{kind} {name}: {cells[kind, name][0]:.1f} dB, {cells[kind, name][1]:.1f} calls/step", flush=True)
    print()
    paper_vs_shooting(runtime, sampling, exact_nodes)
    how = {"euler": "backward Euler", "ddim": "backward Euler (ddim runs euler)", "heun": "backward Euler, own step",
           "dpm_2": "backward Euler, own step"}
    print()
    for name in SAMPLERS:
        (fd, fc), (ed, ec) = cells["flow", name], cells["eps", name]
        default = "shooting, CFG++ run first" if name.endswith("_cfg_pp") else "shooting"
        print(f"| `{name}` | {how.get(name, default)} | {fd:.0f} dB, {fc:.0f} | {ed:.0f} dB, {ec:.0f} |")


def paper_vs_shooting(runtime, sampling, exact_nodes):
    """dpmpp_2m at 10 steps, cfg 5 on the tiny SD1.5-layout model: the paper's algorithm (with our refine
    passes) against shooting, one 8x8 latent generated from seeded noise."""
    import comfy.samplers
    model = runtime.nodes.UNETLoader().load_unet("tiny_sd15_eps.safetensors", "default")[0]
    common = runtime.pack_module("inversion_ops.common")
    positive, negative = (conditioning(768, 0, seed) for seed in (1, 2))
    for key in ("dpmpp_2m_backward_euler", "dpmpp_2m"):
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 10).cpu()
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        sampler, log = comfy.samplers.sampler_object("dpmpp_2m"), common.StepLog()
        with torch.inference_mode():
            image = sampling.run_sampler(model, positive, negative, 5.0, {"samples": torch.zeros(1, 4, 8, 8)},
                                         sampler, sigmas, noise=noise, seed=3)
            inverted = sampling.invert_whole_latent(model, positive, negative, 5.0, image,
                                                    exact_nodes.inversion_sampler(key, log=log), sigmas.flip(0))
            regen = sampling.run_sampler(model, positive, negative, 5.0, inverted, sampler, sigmas)
        print(f"sd15 dpmpp_2m 10 steps cfg 5, {key}: {float(nmse_db(regen['samples'], image['samples'])):.1f} dB, "
              f"{log.model_calls / 10:.1f} calls/step", flush=True)


if __name__ == "__main__":
    main()
