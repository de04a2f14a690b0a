"""The exact suite's trained part (`make bench SUITE=exact_trained [QUICK=1]`): exact vs naive inversion on
the TRAINED tiny models (models/README.md), beside the analytic mixture in the same run.

Parts:
  trained   ComfyUI in-process (CPU, float32, 2 threads, batch 1): tiny_sd15_trained (SD1.5-layout EPS
            UNet, karras) and tiny_sd3_trained (SD3-layout MMDiT flow, simple), loaded by
            CheckpointLoaderSimple. The latent is the example workflows' cat-face emoji through the
            checkpoint's VAE ("real"), and at cfg 5 also one the sampler generated from seed 3 ("generated",
            so an exact preimage exists). Prompt "cat face", negative "". euler and dpmpp_2m, 10 steps,
            cfg 1, 3, 5, 7.5, 9; Invert Latent's defaults (tolerance 1e-4, 100 iterations, 200 calls per step).
  analytic  the closed-form Gaussian mixture (tests/support/analytic.AnalyticCFG), EPS and flow, the same
            samplers, steps and cfgs (the truth is known there).
  jacobian  why the flow misses: the Jacobian of the last sampling step (x0 = D(x1, sigma_1), the same for
            euler and dpmpp_2m) at the generated trajectory's x1, by finite differences, at cfg 1 and 5:
            the share of eigenvalues with negative real part, the spectral radius of the fixed-point map
            I - J and the singular-value range.
regen_nmse_db = NMSE(Sample(inverted), latent) in the sampler's latent space. Writes
bench/results/exact_trained.json and exact_trained.png (regen NMSE against cfg).
"""
import tempfile
import time
from pathlib import Path

import torch

from bench.common import markdown_table, nmse_vs_cfg_axes, publish, pyplot, save_figure
from bench.exact.analytic import schedules
from bench.exact.samplers import invert_cell
from tests.support.analytic import AnalyticCFG
from tests.support.metrics import nmse_db

CHECKPOINTS = {"sd3_trained": ("tiny_sd3_trained.safetensors", "simple"),
               "sd15_trained": ("tiny_sd15_trained.safetensors", "karras")}
IMAGE = Path(__file__).resolve().parents[2] / "example_workflows" / "input" / "exact_inversion_cat_face.png"
SAMPLERS = ("euler", "dpmpp_2m")
FULL = dict(steps=10, cfgs=(1.0, 3.0, 5.0, 7.5, 9.0))
QUICK = dict(steps=10, cfgs=(1.0, 5.0))
COLUMNS = ("part", "model", "latent", "sampler", "steps", "cfg", "method", "regen_nmse_db", "calls_per_step",
           "seconds")
INVERT = dict(max_iterations=100, tolerance=1e-4)   # Invert Latent's defaults


def load_image():
    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels)[None]


def trained_rows(runtime, grid):
    import comfy.samplers
    sampling, exact_nodes = runtime.pack_module("nodes.sampling"), runtime.pack_module("nodes.exact")
    StepLog = runtime.pack_module("inversion_ops.common").StepLog
    nodes, image, rows, jacobians = runtime.nodes, load_image(), [], []
    for name, (ckpt, scheduler) in CHECKPOINTS.items():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:3]
        positive, negative = (nodes.CLIPTextEncode().encode(clip, text)[0] for text in ("cat face", ""))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler,
                                                 grid["steps"]).cpu().float()

        def run(sampler, latent, cfg, schedule, noise=None):
            with torch.inference_mode():   # as ComfyUI runs nodes
                return sampling.run_sampler(model, positive, negative, cfg, {"samples": latent}, sampler, schedule,
                                            noise=noise)["samples"]

        def regenerate(sampler, latent, cfg):   # starting exactly at the inverted latent
            noise = sampling.InvertedNoise(model, latent).generate_noise({"samples": latent})
            return run(sampler, latent, cfg, sigmas, noise)

        real = vae.encode(image)
        seed_noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(3))
        for sampler_name in SAMPLERS:
            forward = comfy.samplers.sampler_object(sampler_name)
            for cfg in grid["cfgs"]:
                latents = {"real": real}
                if cfg == 5.0:
                    latents["generated"] = run(forward, torch.zeros_like(real), cfg, sigmas, seed_noise)
                for kind, latent in latents.items():
                    for method in ("naive", "exact"):
                        log = StepLog()
                        inverter = exact_nodes.inversion_sampler(sampler_name, method, log=log, **INVERT)
                        start = time.perf_counter()
                        inverted = run(inverter, latent, cfg, sigmas.flip(0))
                        seconds = time.perf_counter() - start
                        back = regenerate(forward, inverted, cfg)
                        rows.append(dict(part="trained", model=name, latent=kind, sampler=sampler_name,
                                         steps=grid["steps"], cfg=cfg, method=method,
                                         regen_nmse_db=round(float(nmse_db(back, latent).max()), 1),
                                         calls_per_step=round(log.model_calls / grid["steps"], 1),
                                         seconds=round(seconds, 1)))
                        print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        if name == "sd3_trained":
            jacobians += last_step_jacobians(model, positive, negative, sigmas, seed_noise, sampling, name)
    return rows, jacobians


def last_step_jacobians(model, positive, negative, sigmas, noise, sampling, name, cfgs=(1.0, 5.0), eps=1e-3):
    """Spectrum of J = d D(x1, sigma_1) / d x1 at the euler trajectory's x1, from `noise`, by forward differences."""
    import comfy.samplers
    out = []
    for cfg in cfgs:
        found = {}

        def probe(model_fn, x, schedule, extra_args=None, callback=None, disable=None):
            extra_args = extra_args or {}
            for i in range(len(schedule) - 2):        # euler down to sigma_1
                denoised = model_fn(x, x.new_ones(1) * schedule[i], **extra_args)
                x = x + (x - denoised) / schedule[i] * (schedule[i + 1] - schedule[i])
            sigma_1, n = schedule[-2], x[0].numel()
            base = model_fn(x, x.new_ones(1) * sigma_1, **extra_args).flatten()
            columns = []
            for start in range(0, n, 256):
                width = min(256, n - start)
                probes = x.flatten().repeat(width, 1)
                probes[torch.arange(width), torch.arange(start, start + width)] += eps
                shifted = model_fn(probes.view(width, *x.shape[1:]), x.new_ones(width) * sigma_1, **extra_args)
                columns.append((shifted.flatten(1) - base) / eps)
            found.update(jacobian=torch.cat(columns).T.double(), sigma_1=float(sigma_1))
            return x

        with torch.inference_mode():
            sampling.run_sampler(model, positive, negative, cfg, {"samples": torch.zeros_like(noise)},
                                 comfy.samplers.KSAMPLER(probe), sigmas, noise=noise)
        jacobian = found["jacobian"]
        eigenvalues, singular = torch.linalg.eigvals(jacobian), torch.linalg.svdvals(jacobian)
        out.append(dict(model=name, cfg=cfg, sigma_1=round(found["sigma_1"], 4), dimension=jacobian.shape[0],
                        negative_real_share=round(float((eigenvalues.real < 0).double().mean()), 3),
                        fixed_point_spectral_radius=round(float((1 - eigenvalues).abs().max()), 2),
                        singular_max=round(float(singular[0]), 3), singular_min=float(f"{float(singular[-1]):.2e}")))
        print(out[-1], flush=True)
    return out


def analytic_rows(runtime, grid):
    """exact_samplers' cells for SAMPLERS at grid's steps and cfgs, with Invert Latent's defaults."""
    rows = []
    for parameterization, sigmas in schedules(grid["steps"]).items():
        x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        for sampler_name in SAMPLERS:
            for cfg in grid["cfgs"]:
                for cell in invert_cell(runtime, AnalyticCFG(parameterization, cfg), x_t, sigmas, sampler_name,
                                        **INVERT):
                    rows.append(dict(part="analytic", model=f"mixture_{parameterization}", latent="generated",
                                     sampler=sampler_name, steps=grid["steps"], cfg=cfg,
                                     **dict(cell, method={"pack": "exact"}.get(cell["method"], cell["method"]))))
    return rows


def summarize(rows, jacobians):
    exact_rows = [r for r in rows if r["method"] == "exact"]

    def worst(**match):
        hits = [r["regen_nmse_db"] for r in exact_rows if all(r[k] == v for k, v in match.items())]
        return max(hits) if hits else None
    summary = {f"worst_regen_nmse_db_{part}_{model}_{sampler}_{latent}": worst(part=part, model=model,
                                                                                sampler=sampler, latent=latent)
               for part, model, latent in sorted({(r["part"], r["model"], r["latent"]) for r in rows})
               for sampler in SAMPLERS}
    summary = {k: v for k, v in summary.items() if v is not None}
    passing = [r for r in exact_rows if r["part"] == "trained" and r["regen_nmse_db"] <= -40]
    trained = sum(r["part"] == "trained" for r in exact_rows)
    summary["trained_cells_at_or_below_minus_40_db"] = f"{len(passing)} of {trained}"
    summary["last_step_jacobian"] = jacobians
    return summary


def plot(rows, path):
    plt = pyplot()
    panels = sorted({(r["part"], r["model"], r["sampler"]) for r in rows})
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(3.6 * ((len(panels) + 1) // 2), 6.4), squeeze=False)
    for ax, (part, model, sampler) in zip(axes.flat, panels):
        for method, colour in (("naive", "tab:red"), ("exact", "tab:green")):
            for latent, marker in (("real", "o-"), ("generated", "x")):
                pts = sorted((r["cfg"], r["regen_nmse_db"]) for r in rows if (r["part"], r["model"], r["sampler"],
                             r["method"], r["latent"]) == (part, model, sampler, method, latent))
                if pts:
                    ax.plot(*zip(*pts), marker, color=colour, label=f"{method}, {latent}")
        kind = " (closed-form model)" if part == "analytic" else " (trained weights)"
        nmse_vs_cfg_axes(ax, f"{model} {sampler}{kind}", -40)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Regenerated-latent NMSE after inversion, 10 steps: trained tiny models (CPU, fp32) "
                 "beside the analytic mixture", fontsize=9)
    save_figure(fig, path)


def main(quick=False):
    from tests.support.comfy_runtime import InProcessComfy
    grid = QUICK if quick else FULL
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        start = time.time()
        rows = analytic_rows(runtime, grid)
        print(f"analytic part: {time.time() - start:.0f} s", flush=True)
        trained, jacobians = trained_rows(runtime, grid)
    rows += trained
    summary = summarize(rows, jacobians)
    notes = ("trained: tiny_sd15_trained (karras) and tiny_sd3_trained (simple) from models/, CPU, float32, batch 1, "
             "16x16 latents, prompt 'cat face', Invert Latent's defaults; analytic: the Gaussian mixture, 2 samples "
             "of 4x8x8. regen_nmse_db is the worst sample's.")
    publish("exact_trained", rows, summary, quick, notes, lambda path: plot(rows, path), COLUMNS)
    return summary
