"""`make bench SUITE=preciseinv [QUICK=1]`: PreciseInv beside naive (DDIM) inversion and exact backward
Euler, on the analytic Gaussian mixture and on the tiny SD1.5-layout and SD3-layout models running in a
real ComfyUI (in-process, CPU, float32, 1 thread, under torch.inference_mode() as ComfyUI runs nodes).

Per model, cfg (1, 3) and steps T (2, 4, 10): invert x0 along Inversion Sigmas ("simple" scheduler)
through the pack's SAMPLER objects (InversionKSampler, PreciseInvKSampler; a StepLog callback records
the model calls and the steps at the iteration cap) and nodes/sampling.run_sampler (ComfyUI's
CFGGuider), regenerate with ComfyUI's own euler sampler over BasicScheduler's sigmas starting exactly
at the inverted latent (nodes/sampling.InvertedNoise), and report
  recon_nmse_db   NMSE of the regenerated latent to x0 (mean over the batch, dB)
  psnr_db         SD1.5 layout only (4 ch: the trained tiny VAE applies): pixel PSNR of the VAE's
                  decode of the regenerated latent against the reference image: decode(x0) for a
                  generated x0, the source photo for x0 = photo (the paper's protocol, capped by the
                  VAE's own reconstruction, vae_psnr_db); psnr_vs_vae_db: against decode(x0)
  model_calls_forward / _backward, seconds (inversion only), steps_at_cap (PreciseInv / exact).
Methods: naive = DDIM inversion as the paper's baseline runs it (bench/common.ddim_inversion: the model
at the current latent, labelled with the noisier sigma); exact = backward Euler with Anderson, tolerance RMS sqrt(1e-5) (= PreciseInv's
eta 1e-5 as an MSE); PreciseInv eta 1e-2 and 1e-5 (tolerance sqrt(eta) on the step residual's RMS,
BB steps, lr 0.2).
x0: the model's own 20-step euler output from seeded noise ("x0 generated"), and for the SD1.5
layout also the held-out 64 px photos in tests/data encoded by the trained tiny TAESD ("x0 photo").
The trained tiny SD1.5 checkpoint (models/README.md; its VAE, its CLIP-L): x0 generated with "cat face", and
held-out emoji (never among its 20 training images) encoded by its VAE with the empty prompt ("x0 emoji").
jacobian rows: singular values of each Euler step's Jacobian at DDIM inversion's points (T = 2):
why the random UNet's photo latents cannot be inverted by any method here.
Conditioning: seeded random tensors (no text encoder); a model call at cfg > 1 is one batched
cond + uncond pass. Writes bench/results/preciseinv.json (or .quick.json) and a .png.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench import preciseinv_analytic
from bench.common import (REPO, PeakMemory, conditioning, ddim_inversion, machine, markdown_table, pyplot,
                          result_path, save_figure, write_results)
from inversion_ops.common import StepLog
from inversion_ops.exact import exact_inversion_euler
from tests.support import metrics

COLUMNS = ("model", "cfg", "steps", "method", "recon_nmse_db", "psnr_db", "psnr_vs_vae_db", "model_calls_forward",
           "model_calls_backward", "seconds", "steps_at_cap")
NAIVE, EXACT, PI_FAST, PI_PRECISE = ("naive (DDIM inversion)", "exact backward Euler (Anderson)",
                                     "PreciseInv eta 1e-2", "PreciseInv eta 1e-5")
ANALYTIC_NAMES = {"naive": NAIVE, "backward euler (anderson)": EXACT, "preciseinv eta 0.01": PI_FAST,
                  "preciseinv eta 1e-05": PI_PRECISE}
EXACT_TOLERANCE = 1e-5 ** 0.5
MODELS = {   # x0: "generated" = the model's own 20-step euler output; "photo" = tests/data photos, encoded
    "sd15": {"label": "tiny SD1.5-layout UNet (EPS, 25.8M params, 4 ch, fp32), x0 generated",
             "unet": "tiny_sd15_eps.safetensors", "width": 768, "pooled": 0, "channels": 4,
             "vae": "tiny_taesd_trained.safetensors", "x0": "generated"},
    "sd15_photo": {"label": "tiny SD1.5-layout UNet (EPS, 25.8M params, 4 ch, fp32), x0 photo",
                   "unet": "tiny_sd15_eps.safetensors", "width": 768, "pooled": 0, "channels": 4,
                   "vae": "tiny_taesd_trained.safetensors", "x0": "photo"},
    # the trained checkpoint (models/README.md): its own VAE and text encoder, 16x16 latents (128 px)
    "sd15_trained": {"label": "trained tiny SD1.5-layout UNet (emoji, EPS, fp32), x0 generated, 'cat face'",
                     "checkpoint": "tiny_sd15_trained.safetensors", "prompt": "cat face", "channels": 4,
                     "side": 16, "x0": "generated"},
    "sd15_trained_photo": {"label": "trained tiny SD1.5-layout UNet (emoji, EPS, fp32), x0 held-out emoji, ''",
                           "checkpoint": "tiny_sd15_trained.safetensors", "prompt": "", "channels": 4, "side": 16,
                           "x0": "emoji"},
    "sd3": {"label": "tiny SD3-layout MMDiT (flow, 1.1M params, 16 ch, fp32), x0 generated",
            "unet": "tiny_sd3_flow.safetensors", "width": 4096, "pooled": 2048, "channels": 16, "vae": None,
            "x0": "generated"},
    "sd3_eps": {"label": "tiny SD3-layout MMDiT as EPS (ModelSamplingDiscrete eps, 16 ch, fp32), x0 generated",
                "unet": "tiny_sd3_flow.safetensors", "sampling": "eps", "width": 4096, "pooled": 2048,
                "channels": 16, "vae": None, "x0": "generated"},
}


def photos(n):
    """n of the repository's held-out 64 px test photos (BHWC, [0, 1])."""
    from PIL import Image
    names = ("photo_chelsea_64.png", "photo_coffee_64.png", "photo_china_64.png")[:n]
    data = os.path.join(REPO, "tests", "data")
    return torch.stack([torch.tensor(list(Image.open(os.path.join(data, name)).convert("RGB").getdata()),
                                     dtype=torch.float32).reshape(64, 64, 3) / 255 for name in names])


def psnr_db(a, b):
    return metrics.psnr_db(a, b).mean().item()


def nmse_db(x, ref):
    return metrics.nmse_db(x.double(), ref.double()).mean().item()


@functools.lru_cache(maxsize=None)   # the whole set is read from disk to pick them: once per n
def emoji(n):
    """n held-out emoji (the trained VAE's held-out split; none is one of the diffusion models' 20 images),
    BHWC in [0, 1], from the dataset `make dataset` provisions."""
    from tools.train_models import EVAL_CAPTIONS, load_emoji, vae_split
    _, captions, pixels = load_emoji()
    held = [i for i in vae_split(len(captions))[1] if captions[i] not in EVAL_CAPTIONS][:n]
    return pixels[held].permute(0, 2, 3, 1).float() / 255


REAL_IMAGES = {"photo": photos, "emoji": emoji}   # x0 kinds that are images encoded by the VAE


def load_model(runtime, spec, batch=1):
    """(model, positive, negative, vae): a checkpoint's own parts and prompt, else the UNet with seeded
    random conditioning and the spec's VAE."""
    nodes = runtime.nodes
    if "checkpoint" in spec:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(spec["checkpoint"])[:3]
        encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
        return model, encode(spec["prompt"]), encode(""), vae
    (model,) = nodes.UNETLoader().load_unet(spec["unet"], "default")
    if spec.get("sampling"):
        (model,) = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, spec["sampling"], False)
    vae = nodes.VAELoader().load_vae(spec["vae"])[0] if spec["vae"] else None
    return (model, conditioning(spec["width"], spec["pooled"], 1, batch),
            conditioning(spec["width"], spec["pooled"], 2, batch), vae)


def make_x0(runtime, spec, model, positive, negative, cfg, batch, vae):
    """x0 as a LATENT: the photos encoded by the VAE, or the model's own 20-step euler output."""
    import comfy.samplers
    if spec["x0"] in REAL_IMAGES:
        return {"samples": vae.encode(REAL_IMAGES[spec["x0"]](batch))}
    sampling = runtime.pack_module("nodes.sampling")
    sigmas20 = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 20).cpu()
    side = spec.get("side", 8)
    noise = torch.randn(batch, spec["channels"], side, side, generator=torch.Generator().manual_seed(3))
    return sampling.run_sampler(model, positive, negative, cfg, {"samples": torch.zeros_like(noise)},
                                comfy.samplers.ksampler("euler"), sigmas20, noise=noise)


def step_jacobian_rows(runtime, model_key, steps=2, chunk=64):
    """Why a model can or cannot be inverted at few steps: singular values of each Euler step's
    Jacobian dStep(x_s)/dx_s (Step(x_s) = euler_step(x_s, D(x_s, s), s, t)) at the points DDIM
    inversion reaches from x0 (the first photo / generated latent), cfg 1, by central finite
    differences through ComfyUI's wrapped model. A smallest singular value near 0 means the step
    (and so the sampler) is not invertible there: no x_s reproduces a nearby x_t."""
    from inversion_ops.common import euler_step, naive_step, sigma_batch
    spec = MODELS[model_key]
    pack = {k: runtime.pack_module(f"nodes.{k}") for k in ("sampling", "sigmas")}
    model, cond, _, vae = load_model(runtime, spec)
    x0 = make_x0(runtime, spec, model, cond, cond, 1.0, 1, vae)
    rows = []

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args, x_t = extra_args or {}, x
        for i in range(len(sigmas) - 1):
            t, s = float(sigmas[i]), float(sigmas[i + 1])
            x_s = naive_step(model, x_t, t, s, extra_args)
            step = lambda z: euler_step(z, model(z, sigma_batch(s, z), **extra_args), s, t)  # noqa: E731
            d, h = x_s[0].numel(), 1e-3 * max(1.0, s)
            basis = torch.eye(d, dtype=x_s.dtype).reshape(d, *x_s.shape[1:]) * h
            columns = [((step(x_s + e) - step(x_s - e)) / (2 * h)).flatten(1)
                       for e in basis.split(chunk)]
            singular = torch.linalg.svdvals(torch.cat(columns).T.double())
            rows.append({"part": "jacobian", "model": spec["label"], "steps": steps, "cfg": 1.0, "step": i,
                         "sigma_from": s, "sigma_to": t, "singular_min": float(singular.min()),
                         "singular_max": float(singular.max()),
                         "condition": float(singular.max() / singular.min())})
            x_t = x_s
        return x

    sigmas = pack["sigmas"].inversion_sigmas(model, "simple", steps)
    pack["sampling"].run_sampler(model, cond, cond, 1.0, x0, pack["sampling"].InversionKSampler(run, {}), sigmas)
    return rows


def inverters(pack, max_iterations, exact_max_iters):
    """method name -> (make(log) -> SAMPLER object recording into the StepLog `log`,
    counts(log) -> (forward, backward, steps at cap))."""
    InversionKSampler = pack["sampling"].InversionKSampler
    pi = pack["preciseinv"]
    capped = lambda log: sum(any(step) for step in log.hit_cap)  # noqa: E731
    exact_options = dict(solver="anderson", tolerance=EXACT_TOLERANCE, max_iterations=exact_max_iters)
    return {
        NAIVE: (lambda log: InversionKSampler(log.observe(ddim_inversion), {}),
                lambda log: (log.model_calls, 0, 0)),
        EXACT: (lambda log: InversionKSampler(log.observe(exact_inversion_euler), exact_options),
                lambda log: (log.model_calls, 0, capped(log))),
        PI_FAST: (lambda log: pi.preciseinv_sampler(1e-2 ** 0.5, max_iterations, log=log),
                  lambda log: (log.model_calls, log.model_calls_backward, capped(log))),
        PI_PRECISE: (lambda log: pi.preciseinv_sampler(1e-5 ** 0.5, max_iterations, log=log),
                     lambda log: (log.model_calls, log.model_calls_backward, capped(log))),
    }


def comfy_rows(runtime, model_key, cfgs, step_counts, batch, max_iterations, exact_max_iters, log):
    import comfy.samplers
    pack = {k: runtime.pack_module(f"nodes.{k}") for k in ("sampling", "sigmas", "preciseinv")}
    run_sampler, InvertedNoise = pack["sampling"].run_sampler, pack["sampling"].InvertedNoise
    spec = MODELS[model_key]
    model, positive, negative, vae = load_model(runtime, spec, batch)
    euler = comfy.samplers.ksampler("euler")
    rows = []
    for cfg in cfgs:
        x0 = make_x0(runtime, spec, model, positive, negative, cfg, batch, vae)
        if vae is not None:   # the image the latent shows, and the photo for the paper's protocol
            decoded_x0 = vae.decode(x0["samples"])
            reference = REAL_IMAGES[spec["x0"]](batch) if spec["x0"] in REAL_IMAGES else decoded_x0
        for steps in step_counts:
            ascending = pack["sigmas"].inversion_sigmas(model, "simple", steps)
            descending = ascending.flip(0)
            for method, (make, counts) in inverters(pack, max_iterations, exact_max_iters).items():
                steps_log = StepLog()
                sampler = make(steps_log)
                start = time.perf_counter()
                inverted = run_sampler(model, positive, negative, cfg, x0, sampler, ascending)
                seconds = time.perf_counter() - start
                noise = InvertedNoise(model, inverted["samples"]).generate_noise(inverted)
                regenerated = run_sampler(model, positive, negative, cfg, inverted, euler, descending, noise=noise)
                forward, backward, at_cap = counts(steps_log)
                row = {"part": "comfy", "model": spec["label"], "cfg": cfg, "steps": steps, "method": method,
                       "recon_nmse_db": nmse_db(regenerated["samples"], x0["samples"]),
                       "model_calls_forward": forward, "model_calls_backward": backward,
                       "seconds": seconds, "steps_at_cap": at_cap, "batch": batch,
                       "max_iterations": max_iterations if method.startswith("PreciseInv") else
                       (exact_max_iters if method == EXACT else None)}
                if vae is not None:
                    decoded = vae.decode(regenerated["samples"])
                    row.update(psnr_db=psnr_db(decoded, reference), psnr_vs_vae_db=psnr_db(decoded, decoded_x0))
                    if spec["x0"] in REAL_IMAGES:
                        row["vae_psnr_db"] = psnr_db(decoded_x0, reference)
                rows.append(row)
                log(row)
    return rows


def analytic_rows(quick):
    rows = []
    for r in preciseinv_analytic.run(quick):
        rows.append({**r, "part": "analytic", "model": f"analytic Gaussian mixture ({r['model']})",
                     "method": ANALYTIC_NAMES.get(r["method"], r["method"])})
    return rows


def pick(rows, model, cfg, steps, method):
    return next((r for r in rows if r["model"] == model and r.get("cfg") == cfg and r.get("steps") == steps
                 and r.get("method") == method), None)


def summarise(rows):
    """Headline: PreciseInv eta 1e-5 minus naive on the SD1.5-layout model (x0 generated; pixels
    through the trained tiny VAE), cfg 1; other cfgs and the photo protocol under suffixed keys."""
    summary = {}
    for key, suffix_x0 in (("sd15", ""), ("sd15_photo", "_photo"), ("sd15_trained", "_trained"),
                           ("sd15_trained_photo", "_trained_photo")):
        label = MODELS[key]["label"]
        for steps in (2, 4, 10):
            for cfg in (1.0, 3.0):
                precise, naive = (pick(rows, label, cfg, steps, m) for m in (PI_PRECISE, NAIVE))
                if precise is None or naive is None:
                    continue
                suffix = f"_T{steps}" + ("" if cfg == 1.0 else f"_cfg{cfg:g}") + suffix_x0
                summary["psnr_gain_db_vs_naive" + suffix] = precise["psnr_db"] - naive["psnr_db"]
                summary["nmse_gain_db_vs_naive" + suffix] = naive["recon_nmse_db"] - precise["recon_nmse_db"]
    for model in sorted({r["model"] for r in rows if "method" in r}):
        for cfg in (1.0, 3.0):
            precise, exact = (pick(rows, model, cfg, 4, m) for m in (PI_PRECISE, EXACT))
            if precise is None or exact is None:
                continue
            key = "seconds_ratio_vs_exact" if (model == MODELS["sd15"]["label"] and cfg == 1.0) else \
                f"seconds_ratio_vs_exact[{model}, cfg {cfg:g}]"
            summary[key] = precise["seconds"] / exact["seconds"]
    for key, suffix_x0 in (("sd15_photo", "_photo"), ("sd15_trained_photo", "_trained_photo")):
        photo = [r for r in rows if "vae_psnr_db" in r and r["model"] == MODELS[key]["label"]]
        if photo:
            summary["vae_psnr_db" + suffix_x0] = photo[0]["vae_psnr_db"]
    summary["paper_anchor_psnr_gain_db_T2"] = 25.93 - 20.62
    for r in rows:
        if r["part"] == "jacobian":
            key = f"step_jacobian_min_singular_T2[{r['model']}]"
            summary[key] = min(summary.get(key, float("inf")), r["singular_min"])
    return summary


def plot(rows, path):
    plt = pyplot()
    rows = [r for r in rows if "method" in r]
    rows = [r for r in rows if "cfg" in r]   # the memory rows have no curve
    panels = sorted({(r["model"], r["cfg"]) for r in rows})
    cols = min(len(panels), 5)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (model, cfg) in zip(axes.flat, panels):
        for method in (NAIVE, EXACT, PI_FAST, PI_PRECISE):
            pts = sorted((r["steps"], r["recon_nmse_db"]) for r in rows
                         if r["model"] == model and r["cfg"] == cfg and r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        x0 = model.split("), ")[1] if "), " in model else ""
        name = model if model.startswith("analytic") else model.split(" (")[0]
        ax.set_title(f"{name}\n{x0} cfg {cfg:g}", fontsize=8)
        ax.set_xlabel("steps T")
        ax.set_xscale("log")
        ax.set_xticks([2, 4, 10], ["2", "4", "10"])
        ax.minorticks_off()
    for row in axes:
        row[0].set_ylabel("reconstruction NMSE (dB)")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)


MEMORY_LATENT = 32   # latent side for the memory rows: 256 px images for the tiny SD1.5 layout
MEMORY_NOTE = (" preciseinv_peak_ratio_vs_sampling: peak memory (weights included, above a running ComfyUI "
               "with torch._dynamo imported: the 'torch._dynamo import' row gives that import's own cost) of "
               "PreciseInv inverting (eta 1e-5, max_iterations 10, blocks recomputed in the backward pass) over "
               f"plain euler sampling, 4 steps, cfg 1, batch 1, {8 * MEMORY_LATENT} px, tiny SD1.5 layout, "
               "each in a fresh process; _mmap_threshold_64k: both again with MALLOC_MMAP_THRESHOLD_=65536, so "
               "freed blocks of 64 KiB or more leave the process (what remains is need, not glibc's retention).")


def memory_worker(method, out_path):
    """Peak memory of plain euler sampling, or of PreciseInv inverting, 4 steps on the tiny SD1.5-layout
    model at 256 px, weights included: above the level of a running ComfyUI before the model loads
    (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated). torch._dynamo, which torch.utils.checkpoint
    imports on its first call, is part of that level in both workers: a fixed cost of code, once per
    process, that the row "torch._dynamo import" measures on its own."""
    import importlib
    import math

    from tests.support.comfy_runtime import InProcessComfy
    runtime = InProcessComfy(tempfile.mkdtemp(prefix="bench_preciseinv_mem_"))
    torch.set_num_threads(1)
    import comfy.model_management
    import comfy.samplers
    sampling, pi = runtime.pack_module("nodes.sampling"), runtime.pack_module("nodes.preciseinv")
    if method == "torch._dynamo import":
        meter, start = PeakMemory(), time.perf_counter()
        importlib.import_module("torch._dynamo")
        json.dump({"method": method, "peak_mem_mb": meter.peak_mb(), "seconds": time.perf_counter() - start},
                  open(out_path, "w"))
        return
    importlib.import_module("torch._dynamo")
    meter = PeakMemory()
    with torch.inference_mode():
        model = runtime.nodes.UNETLoader().load_unet(MODELS["sd15"]["unet"], "default")[0]
        cond = conditioning(MODELS["sd15"]["width"], 0, 1, 1)
        latent = {"samples": torch.randn(1, 4, MEMORY_LATENT, MEMORY_LATENT, generator=torch.Generator().manual_seed(0))}
        start = time.perf_counter()
        if method == "sampling":
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4).cpu()
            sampling.run_sampler(model, cond, cond, 1.0, latent, comfy.samplers.ksampler("euler"), sigmas,
                                 noise=torch.zeros_like(latent["samples"]))
        else:
            pi.invert_latent(model, cond, cond, latent, "euler", "simple", 4, 1.0, math.sqrt(1e-5), 10)
    json.dump({"method": method, "peak_mem_mb": meter.peak_mb(), "seconds": time.perf_counter() - start}, open(out_path, "w"))


# glibc keeps freed heap memory in the process (peak RSS counts it); with this threshold every block of
# 64 KiB or more is mmap'ed and goes back to the system when freed, which separates retention from need
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_rows():
    """Plain sampling and PreciseInv, each in a fresh process (peak memory is per process), with glibc's
    default allocator settings and again with MMAP_THRESHOLD in both."""
    rows = []
    runs = [(m, "default") for m in ("sampling", "preciseinv", "torch._dynamo import")]
    runs += [(m, "mmap_threshold_64k") for m in ("sampling", "preciseinv")]
    with tempfile.TemporaryDirectory() as tmp:
        for method, allocator in runs:
            out = os.path.join(tmp, "worker.json")
            env = {**os.environ, **(MMAP_THRESHOLD if allocator != "default" else {})}
            subprocess.run([sys.executable, "-m", "bench.preciseinv", "--memory-worker", method, out], check=True,
                           env=env, cwd=REPO)
            r = json.load(open(out))
            rows.append(dict(part="memory", model=MODELS["sd15"]["label"], size_px=8 * MEMORY_LATENT,
                             allocator=allocator, **r))
            print(f"memory {method} ({allocator}): +{r['peak_mem_mb']:.0f} MiB ({r['seconds']:.1f} s)", flush=True)
    return rows


def memory_summary(rows):
    """preciseinv_peak_ratio_vs_sampling (glibc defaults) and its mmap-threshold twin."""
    memory = {(r["method"], r.get("allocator", "default")): r["peak_mem_mb"] for r in rows if r["part"] == "memory"}
    out = {"preciseinv_peak_ratio_vs_sampling": memory["preciseinv", "default"] / memory["sampling", "default"]}
    if ("preciseinv", "mmap_threshold_64k") in memory:
        out["preciseinv_peak_ratio_vs_sampling_mmap_threshold_64k"] = (memory["preciseinv", "mmap_threshold_64k"]
                                                                       / memory["sampling", "mmap_threshold_64k"])
    return out


def main(quick: bool = False):
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = analytic_rows(quick)
    print(f"analytic: {len(rows)} rows, {time.perf_counter() - started:.0f} s", flush=True)
    from tests.support.comfy_runtime import InProcessComfy
    runtime = InProcessComfy(tempfile.mkdtemp(prefix="bench_preciseinv_"))
    torch.set_num_threads(1)

    def log(r):
        print(f"  {r['model'][:22]} cfg {r['cfg']:g} T {r['steps']:>2} {r['method']:<32} "
              f"{r['recon_nmse_db']:7.1f} dB  psnr {r.get('psnr_db', float('nan')):5.1f}  "
              f"calls {r['model_calls_forward']}+{r['model_calls_backward']}  {r['seconds']:6.1f} s  "
              f"cap {r['steps_at_cap']}", flush=True)

    # model: (cfgs, steps, batch, PreciseInv max_iterations, exact max_iters). SD1.5's UNet costs
    # ~0.25 s per forward + backward here; its photo latents are ill-conditioned (see the jacobian
    # rows: every method stops at its cap), so that protocol runs a smaller grid with lower caps.
    plan = ({"sd15": ((1.0,), (2, 4), 1, 50, 50), "sd15_photo": ((1.0,), (2,), 1, 10, 20),
             "sd15_trained": ((1.0,), (2, 4), 1, 30, 50), "sd15_trained_photo": ((1.0,), (2,), 1, 20, 20),
             "sd3": ((1.0, 3.0), (2, 4, 10), 1, 100, 100), "sd3_eps": ((1.0,), (2, 4), 1, 100, 100)} if quick else
            {"sd15": ((1.0, 3.0), (2, 4, 10), 1, 100, 100), "sd15_photo": ((1.0,), (2, 4), 2, 30, 50),
             "sd15_trained": ((1.0, 3.0), (2, 4, 10), 1, 50, 100), "sd15_trained_photo": ((1.0,), (2, 4), 2, 30, 50),
             "sd3": ((1.0, 3.0), (2, 4, 10), 2, 200, 100), "sd3_eps": ((1.0, 3.0), (2, 4, 10), 2, 200, 100)})
    with torch.inference_mode():   # as ComfyUI's executor runs every node
        for key in MODELS:
            rows += step_jacobian_rows(runtime, key)
            print(f"jacobian {key}: " + ", ".join(f"step {r['step']} sigma {r['sigma_from']:.3g}: singular "
                                                  f"{r['singular_min']:.2e}..{r['singular_max']:.2e}"
                                                  for r in rows if r["part"] == "jacobian"
                                                  and r["model"] == MODELS[key]["label"]), flush=True)
        for key, (cfgs, step_counts, batch, max_iterations, exact_max_iters) in plan.items():
            rows += comfy_rows(runtime, key, cfgs, step_counts, batch, max_iterations, exact_max_iters, log)
    rows += memory_rows()
    summary = summarise(rows)
    summary.update(memory_summary(rows))
    notes = ("CPU, float32, torch.set_num_threads(1), shared machine (wall seconds include contention). "
             "The sd15, sd15_photo, sd3 and sd3_eps models have random weights (their images are meaningless, "
             "round-trip exactness is what is measured); sd15_trained and sd15_trained_photo are the trained "
             "checkpoint with its own VAE and text encoder at 128 px (16x16 latents), x0 'cat face' generated "
             "or held-out emoji encoded by its VAE with the empty prompt (the paper's real-image protocol). PreciseInv max_iterations per step: " +
             ", ".join(f"{k} {v[3]}" for k, v in plan.items()) + f"; exact: Anderson, tol RMS "
             f"{EXACT_TOLERANCE:.2e}, max iterations " + ", ".join(f"{k} {v[4]}" for k, v in plan.items()) +
             ". Batch: " +
             ", ".join(f"{k} {v[2]}" for k, v in plan.items()) + ". psnr_gain_db_vs_naive_T*: PreciseInv eta "
             "1e-5 minus naive, SD1.5 layout, x0 generated, PSNR of the trained tiny VAE's decode of the "
             "regenerated latent against its decode of x0, cfg 1 (suffix _cfg3: cfg 3; _photo: x0 = photos "
             "encoded, PSNR against the photo, the paper's protocol). Paper anchor +5.31 dB (SD1.4, T=2: "
             "25.93 vs 20.62 against the photo). seconds_ratio_vs_exact: PreciseInv eta 1e-5 over exact "
             "backward Euler at T = 4, SD1.5 layout, x0 generated, cfg 1." + MEMORY_NOTE)
    path = write_results("preciseinv", rows, summary, quick, notes)
    plot(rows, result_path("preciseinv", "png", quick))
    print(markdown_table([r for r in rows if "method" in r and r["part"] != "memory"], COLUMNS))
    print()
    print(markdown_table([r for r in rows if r["part"] == "jacobian"],
                         ("model", "step", "sigma_from", "sigma_to", "singular_min", "singular_max"), "{:.3g}"))
    print("\nsummary:", summary)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return summary


def memory_only(quick):
    """`python -m bench.preciseinv --memory-only [--quick]`: the memory rows and their summary key alone,
    written into the existing result file; the rows carry the commit and date they were measured at."""
    path = result_path("preciseinv", "json", quick)
    with open(path) as f:
        result = json.load(f)
    measured = {k: machine()[k] for k in ("commit", "date")}
    rows = [dict(r, **measured) for r in memory_rows()]
    result["rows"] = [r for r in result["rows"] if r["part"] != "memory"] + rows
    result["summary"].update(memory_summary(rows))
    note = (f" Memory rows rerun alone (--memory-only) at commit {measured['commit']}, {measured['date']}, "
            f"same machine kind; the other rows are from the run in `machine`.")
    result["notes"] = result["notes"].split(" preciseinv_peak_ratio_vs_sampling:")[0] + MEMORY_NOTE + note
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"preciseinv_peak_ratio_vs_sampling {result['summary']['preciseinv_peak_ratio_vs_sampling']:.2f}; "
          f"wrote {path}")


if __name__ == "__main__":   # memory_rows' worker processes, and --memory-only (the suite runs from bench/run.py)
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-worker":
        memory_worker(sys.argv[2], sys.argv[3])
    elif "--memory-only" in sys.argv:
        memory_only(quick="--quick" in sys.argv)
