"""The exact suite's first part (`make bench SUITE=exact.euler_dpmpp [QUICK=1]`): exact (backward Euler) vs
naive inversion of ComfyUI's euler and dpmpp_2m, side by side on
  (a) the analytic Gaussian mixture, EPS and flow (bench/exact/analytic.py: the truth is known), and
  (b) a real ComfyUI in-process (CPU, float32, 1 thread, batch 1, 64 px = 8x8 latents, random
      conditioning): the tiny SD1.5-layout EPS UNet, its v-prediction variant (ModelSamplingDiscrete)
      and the tiny SD3-layout flow MMDiT, all with random weights.

(b): x_T = noise_scaling(sigma_max, randn) in the sampler's space; x0 = ComfyUI's own sampler
(comfy.samplers.sampler_object) from x_T through the pack's run_sampler (CFGGuider), started exactly at
x_T via InvertedNoise; invert x0 through run_sampler with the pack's InversionKSampler over the ascending
schedule (a StepLog callback records the model calls and the steps at the iteration cap); regenerate
from x_T_hat the same way as x0. Every run_sampler call runs under torch.inference_mode(), as ComfyUI
runs nodes. noise_nmse_db = NMSE(x_T_hat, x_T), regen_nmse_db = NMSE(x0_hat, x0), both in the
sampler's latent space; model_calls are CFG calls of the inversion, seconds its wall time.
Schedulers: normal (SD1.5), simple (SD3). Tolerance 1e-4 RMS per element (the node default; float32).
Methods:
  naive                   FlipSigmas + euler (one call per step)
  exact_fixed_point       the paper's solver: rho 0.5, 20-iteration warm-up, halving on plateau, <= 500
                          iterations per step; dpmpp_2m: the paper's single pass
  exact_anderson          Anderson mixing, <= 500 iterations; dpmpp_2m: single pass
  exact_anderson_refined  dpmpp_2m only: what Invert Latent runs (single pass + up to 20 refine passes)
At high cfg several noises give (nearly) the same image, so regen_nmse_db is the test of exactness.
Writes bench/results/exact.json (or exact.quick.json) and exact.png (noise NMSE against cfg).
"""
import tempfile
import time

import torch

from bench.common import conditioning, find_row, markdown_table, publish, pyplot, save_figure
from bench.exact import analytic
from inversion_ops import exact
from inversion_ops.common import StepLog
from tests.support.metrics import nmse_db

TOL = 1e-4
MAX_ITERATIONS = 500
COLUMNS = ("part", "model", "sampler", "steps", "cfg", "method", "noise_nmse_db", "regen_nmse_db",
           "model_calls", "capped_steps", "seconds")
SUMMARY_CASE = dict(part="comfyui", model="sd15_eps", sampler="euler", steps=50, cfg=5.0)

# (model, sampler, steps) -> cfgs; the paper's fixed point (up to 500 calls per step) runs on the
# cfgs in PAPER_CFGS only: on this shared 2-core CPU its full grid would take hours.
FULL_GRID = {
    "sd15_eps": {("euler", 10): (1.0, 3.0, 5.0, 7.5), ("euler", 50): (1.0, 3.0, 5.0, 7.5),
                 ("dpmpp_2m", 10): (1.0, 3.0, 5.0, 7.5), ("dpmpp_2m", 20): (5.0,)},
    "sd15_v": {("euler", 10): (1.0, 3.0, 5.0, 7.5), ("dpmpp_2m", 10): (1.0, 5.0)},
    "sd3_flow": {("euler", 10): (1.0, 3.0, 5.0, 7.5), ("euler", 50): (1.0, 3.0, 5.0, 7.5),
                 ("dpmpp_2m", 10): (1.0, 3.0, 5.0, 7.5), ("dpmpp_2m", 20): (1.0, 3.0, 5.0, 7.5)},
}
QUICK_GRID = {
    "sd15_eps": {("euler", 10): (1.0, 5.0)},
    "sd3_flow": {("euler", 10): (1.0, 5.0), ("dpmpp_2m", 10): (1.0, 5.0)},
}
PAPER_CFGS = {"full": (5.0,), "quick": (5.0,)}
SCHEDULER = {"sd15_eps": "normal", "sd15_v": "normal", "sd3_flow": "simple"}


def inverters(sampler, refine_passes):
    """method -> (inversion function in k-diffusion's shape, its options) for the pack's InversionKSampler."""
    paper = dict(solver="fixed_point", tolerance=TOL, max_iterations=MAX_ITERATIONS)
    fast = dict(solver="anderson", tolerance=TOL, max_iterations=MAX_ITERATIONS)
    if sampler == "euler":
        return {"naive": (exact.naive_inversion, {}),
                "exact_fixed_point": (exact.exact_inversion_euler, paper),
                "exact_anderson": (exact.exact_inversion_euler, fast)}
    return {"naive": (exact.naive_inversion, {}),
            "exact_fixed_point": (exact.exact_inversion_dpmpp_2m, dict(paper, refine_passes=0)),
            "exact_anderson": (exact.exact_inversion_dpmpp_2m, dict(fast, refine_passes=0)),
            "exact_anderson_refined": (exact.exact_inversion_dpmpp_2m, dict(fast, refine_passes=refine_passes))}


def comfy_rows(quick):
    from tests.support.comfy_runtime import InProcessComfy
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        import comfy.samplers
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
        sampling = runtime.pack_module("nodes.sampling")
        sd15 = runtime.nodes.UNETLoader().load_unet("tiny_sd15_eps.safetensors", "default")[0]
        models = {"sd15_eps": (sd15, 768, 0),
                  "sd15_v": (ModelSamplingDiscrete().patch(sd15, "v_prediction", False)[0], 768, 0),
                  "sd3_flow": (runtime.nodes.UNETLoader().load_unet("tiny_sd3_flow.safetensors", "default")[0],
                               4096, 2048)}
        torch.set_num_threads(1)   # tiny tensors: threads only contend on the shared machine
        rows = []
        for name, grid in (QUICK_GRID if quick else FULL_GRID).items():
            model, width, pooled = models[name]
            positive, negative = conditioning(width, pooled, 1), conditioning(width, pooled, 2)
            ms = model.get_model_object("model_sampling")
            channels = model.get_model_object("latent_format").latent_channels

            def through_comfy(sampler, latent, sigmas, cfg, start_exactly):
                noise = sampling.InvertedNoise(model, latent).generate_noise({"samples": latent}) \
                    if start_exactly else None
                with torch.inference_mode():   # as ComfyUI's executor runs every node (no autograd graph)
                    return sampling.run_sampler(model, positive, negative, cfg, {"samples": latent}, sampler,
                                                sigmas, noise=noise)["samples"]

            for (sampler, steps), cfgs in grid.items():
                sigmas = comfy.samplers.calculate_sigmas(ms, SCHEDULER[name], steps).cpu().float()
                randn = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
                x_t = ms.noise_scaling(sigmas[0], randn, torch.zeros_like(randn))
                x_t_latent = model.model.process_latent_out(x_t)
                forward = comfy.samplers.sampler_object(sampler)
                for cfg in cfgs:
                    image = through_comfy(forward, x_t_latent, sigmas, cfg, True)
                    for method, (function, options) in inverters(sampler, exact.REFINE_PASSES).items():
                        if method == "exact_fixed_point" and cfg not in PAPER_CFGS["quick" if quick else "full"]:
                            continue
                        log = StepLog()
                        inverter = sampling.InversionKSampler(log.observe(function), options)
                        start = time.perf_counter()
                        recovered = through_comfy(inverter, image, sigmas.flip(0), cfg, False)
                        seconds = time.perf_counter() - start
                        regenerated = through_comfy(forward, recovered, sigmas, cfg, True)
                        in_sampler_space = model.model.process_latent_in
                        rows.append(dict(
                            part="comfyui", model=name, sampler=sampler, steps=steps, cfg=cfg, method=method,
                            noise_nmse_db=round(float(nmse_db(in_sampler_space(recovered), x_t).mean()), 1),
                            regen_nmse_db=round(float(nmse_db(in_sampler_space(regenerated),
                                                              in_sampler_space(image)).mean()), 1),
                            model_calls=log.model_calls, capped_steps=sum(any(c) for c in log.hit_cap),
                            seconds=round(seconds, 2)))
                        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        return rows


def summarize(rows, quick):
    case = dict(SUMMARY_CASE, steps=10) if quick else SUMMARY_CASE
    naive, paper, fast = (find_row(rows, **case, method=m) for m in ("naive", "exact_fixed_point", "exact_anderson"))
    dpm = dict(case, sampler="dpmpp_2m", steps=10)
    dpm_single, dpm_refined = find_row(rows, **dpm, method="exact_anderson"), find_row(rows, **dpm, method="exact_anderson_refined")
    get = lambda row, key: row[key] if row else None
    summary = {
        "case": case,
        "naive_noise_nmse_db": get(naive, "noise_nmse_db"),
        "exact_noise_nmse_db": get(fast, "noise_nmse_db"),
        "exact_fixed_point_noise_nmse_db": get(paper, "noise_nmse_db"),
        "naive_regen_nmse_db": get(naive, "regen_nmse_db"),
        "exact_regen_nmse_db": get(fast, "regen_nmse_db"),
        "exact_fixed_point_regen_nmse_db": get(paper, "regen_nmse_db"),
        "calls_accelerated": get(fast, "model_calls"), "calls_paper": get(paper, "model_calls"),
        "capped_steps_accelerated": get(fast, "capped_steps"), "capped_steps_paper": get(paper, "capped_steps"),
        "calls_ratio_accelerated_vs_paper": (round(fast["model_calls"] / paper["model_calls"], 3)
                                             if fast and paper else None),
        "dpmpp_2m_exact_noise_nmse_db": get(dpm_refined, "noise_nmse_db"),
        "dpmpp_2m_exact_regen_nmse_db": get(dpm_refined, "regen_nmse_db"),
        "dpmpp_2m_single_pass_noise_nmse_db": get(dpm_single, "noise_nmse_db"),
        "dpmpp_2m_single_pass_regen_nmse_db": get(dpm_single, "regen_nmse_db"),
    }
    return summary


def plot(rows, path):
    plt = pyplot()
    panels = sorted({(r["part"], r["model"], r["sampler"], r["steps"]) for r in rows},
                    key=lambda p: (p[0], p[1], p[2], p[3]))
    cols = 4
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    colours = {"naive": "tab:red", "exact_fixed_point": "tab:blue", "exact_anderson": "tab:green",
               "exact_anderson_refined": "tab:purple"}
    for ax, (part, model, sampler, steps) in zip(axes.flat, panels):
        for method, colour in colours.items():
            pts = sorted((r["cfg"], r["noise_nmse_db"], r["regen_nmse_db"]) for r in rows
                         if (r["part"], r["model"], r["sampler"], r["steps"], r["method"]) ==
                         (part, model, sampler, steps, method))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=f"{method} noise")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=colour, alpha=0.5,
                        label=f"{method} regen")
        ax.set_title(f"{part}: {model} {sampler} {steps} steps", fontsize=9)
        ax.set_xlabel("cfg")
        ax.set_ylabel("NMSE dB")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Exact vs naive inversion: noise NMSE (solid) and regenerated-latent NMSE (dashed) against cfg")
    save_figure(fig, path, rect=(0, 0.06, 1, 0.97))


def main(quick=False):
    start = time.time()
    rows = [dict(part="analytic", capped_steps="", **r) for r in analytic.run(quick)]
    print(f"analytic part: {time.time() - start:.0f} s", flush=True)
    rows += comfy_rows(quick)
    summary = summarize(rows, quick)
    notes = ("(a) analytic Gaussian mixture, 2 samples of 4x8x8 (bench/exact/analytic.py); (b) tiny random-"
             "weight ComfyUI models in-process, batch 1, 8x8 latents (64 px), float32, CPU, 1 thread. "
             "Tolerance 1e-4 RMS per element. The paper's fixed point runs at cfg 5 only (up to 500 calls "
             "per step). Grid: " + repr({m: {f"{s} {n}": c for (s, n), c in g.items()}
                                          for m, g in (QUICK_GRID if quick else FULL_GRID).items()}))
    publish("exact", rows, summary, quick, notes, lambda path: plot(rows, path), COLUMNS)
    return summary
