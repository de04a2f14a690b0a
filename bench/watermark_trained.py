"""`make bench SUITE=watermark_trained [QUICK=1]`: Tree-Ring detection on a TRAINED tiny model in a real ComfyUI,
beside bench/watermark.py's analytic model.

  model      tiny_sd3_trained (models/README.md: SD3-layout MMDiT, rectified flow, trained on 20 emoji captions)
             with its 16-channel TAESD-layout VAE, loaded by CheckpointLoaderSimple; ComfyUI in-process, CPU,
             float32, 2 threads; 128 px images, 16x16 latents
  generation SamplerCustom's path (nodes.sampling.run_sampler: CFGGuider), prompt "cat face", negative "", cfg 5,
             'simple' schedule; watermarked: Tree-Ring Noise (rings on channel 3, radius 5, one key); clean:
             ComfyUI's seeded noise (comfy.sample.prepare_noise, another seed)
  routes     latent: the generated latent itself (no image); vae_encode: VAE Decode -> 8-bit image -> attack ->
             VAE Encode; decoder_inversion: the same image through Decoder Inversion (forward_step, 50 iterations)
  attacks    none (the 8-bit image); jpeg75 (bench/watermark.attack) on the vae_encode route
  detection  Tree-Ring Detect's path: an empty prompt at cfg 1 (the paper's setting), naive (FlipSigmas + euler) or
             exact (Invert Latent's inverter for the sampler), inversion_ops.watermark.detect on the unit noise
  samplers   dpmpp_2m 10 steps (every route) and euler 50 steps (latent, vae_encode without attack): CELLS
Per cell: AUC, TPR at 1% FPR (threshold from the clean set), the clean set's rate at p < 1%, seconds and model calls
per detection (the batch is inverted at once: calls are batched calls, each image takes part in every one).
"""
import tempfile
import time

import numpy as np
import torch

from bench.common import markdown_table, publish, pyplot, save_figure
from bench.watermark import attack, detection_stats

CHECKPOINT, SCHEDULER, PROMPT, CFG = "tiny_sd3_trained.safetensors", "simple", "cat face", 5.0
CHANNEL, RADIUS, KEY = 3, 5, 20231
SEEDS = {"marked": 7, "clean": 100}
# (sampler, steps, route, attack). Shooting spends its whole budget (2,000 calls per detection) on the image
# routes, where no latent regenerates the encoded one, so the grid is small
CELLS = [("dpmpp_2m", 10, "latent", "none"), ("dpmpp_2m", 10, "vae_encode", "none"),
         ("dpmpp_2m", 10, "decoder_inversion", "none"), ("dpmpp_2m", 10, "vae_encode", "jpeg75"),
         ("euler", 50, "latent", "none"), ("euler", 50, "vae_encode", "none")]
QUICK_CELLS = CELLS[:2]
COLUMNS = ("sampler", "steps", "route", "attack", "method", "auc", "tpr_at_1fpr", "clean_fpr_at_p01",
           "seconds_per_detection", "model_calls_per_detection")
MODEL_LABEL = ("trained tiny SD3-layout MMDiT (flow, 1.88M params, emoji) + its 16-channel TAESD-layout VAE, "
               "float32, CPU")


def to_uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def encode_route(decoder_nodes, vae, latents, route, attack_name):
    """Each set's latent as the detector sees it after `route` (and the attack on its 8-bit image), and the
    seconds spent encoding."""
    rng, encoded, seconds = np.random.default_rng(1), {}, 0.0
    for kind, z in latents.items():
        if route == "latent":
            encoded[kind] = z
            continue
        pixels = attack(to_uint8(vae.decode(z)), attack_name, rng)
        image = torch.from_numpy(pixels).float() / 255
        start = time.perf_counter()
        encoded[kind] = vae.encode(image) if route == "vae_encode" else decoder_nodes.invert_image(vae, image)[0]
        seconds += time.perf_counter() - start
    return encoded, seconds


def run(runtime, n, cells):
    import comfy.sample
    import comfy.samplers
    nodes, sampling = runtime.nodes, runtime.pack_module("nodes.sampling")
    exact_nodes, wm_nodes = runtime.pack_module("nodes.exact"), runtime.pack_module("nodes.watermark")
    decoder_nodes, watermark = runtime.pack_module("nodes.decoder"), runtime.pack_module("inversion_ops.watermark")
    StepLog = runtime.pack_module("inversion_ops.common").StepLog
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[:3]
    prompt, empty = (nodes.CLIPTextEncode().encode(clip, text)[0] for text in (PROMPT, ""))
    zero = torch.zeros(n, 16, 16, 16)
    marked = wm_nodes.TreeRingNoiseObject(SEEDS["marked"], KEY, CHANNEL, RADIUS)
    noise = {"marked": marked.generate_noise({"samples": zero}),
             "clean": comfy.sample.prepare_noise(zero, SEEDS["clean"], None)}
    rows, curves, latents = [], {}, {}
    for sampler_name, steps, route, attack_name in cells:
        model_sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, SCHEDULER, steps).cpu().float()
        if sampler_name not in latents:
            with torch.inference_mode():
                latents[sampler_name] = {kind: sampling.run_sampler(
                    model, prompt, empty, CFG, {"samples": zero}, comfy.samplers.sampler_object(sampler_name), sigmas,
                    noise=noise[kind])["samples"] for kind in noise}
        encoded, encode_seconds = encode_route(decoder_nodes, vae, latents[sampler_name], route, attack_name)
        for method in ("naive", "exact"):
            detections, calls, seconds = {}, 0, encode_seconds
            for kind, z in encoded.items():
                log = StepLog()
                start = time.perf_counter()
                with torch.inference_mode():
                    inverted = sampling.invert_whole_latent(
                        model, empty, empty, 1.0, {"samples": z},
                        exact_nodes.inversion_sampler(sampler_name, method, log=log), sigmas.flip(0))["samples"]
                detections[kind] = watermark.detect(wm_nodes.unit_noise(model, inverted, sigmas[0]), KEY, CHANNEL,
                                                    RADIUS)
                seconds += time.perf_counter() - start
                calls += log.model_calls
            stats, curves[(sampler_name, route, attack_name, method)] = detection_stats(detections, seconds, calls, n, 3)
            rows.append(dict(sampler=sampler_name, steps=steps, route=route, attack=attack_name, method=method,
                             **stats))
            print(markdown_table(rows[-1:], COLUMNS, floatfmt="{:g}").splitlines()[-1], flush=True)
    return rows, curves


def plot(curves, path, title=None):
    plt = pyplot()
    panels = sorted({(s, r, a) for s, r, a, _ in curves})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.5), squeeze=False)
    for ax, (sampler, route, attack_name) in zip(axes.flat, panels):
        for method, style in (("naive", "--"), ("exact", "-")):
            fpr, tpr = curves[(sampler, route, attack_name, method)]
            ax.plot(fpr, tpr, style, label=method)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.6)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_title(f"{sampler}, {route}, {attack_name}", fontsize=8)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"Tree-Ring detection ROC on the trained tiny SD3-layout model (cfg {CFG:g} generation, "
                          "empty prompt cfg 1 detection)", fontsize=9)
    save_figure(fig, path, dpi=100)


def summarize(rows, seconds):
    """AUC and TPR at 1% FPR of every dpmpp_2m 10-step cell (the seeds' setting), keyed by route, attack, method."""
    summary = {"model": MODEL_LABEL, "case": {"sampler": "dpmpp_2m", "steps": 10}}
    for r in rows:
        if r["sampler"] == "dpmpp_2m":
            cell = f"{r['route']}_{r['attack']}_{r['method']}"
            summary[f"auc_{cell}"], summary[f"tpr_at_1fpr_{cell}"] = r["auc"], r["tpr_at_1fpr"]
    summary["seconds"] = round(seconds, 1)
    return summary


def main(quick=False):
    from tests.support.comfy_runtime import InProcessComfy
    torch.set_num_threads(2)
    n = 8 if quick else 16
    start = time.time()
    with tempfile.TemporaryDirectory() as base:
        rows, curves = run(InProcessComfy(base), n, QUICK_CELLS if quick else CELLS)
    summary = summarize(rows, time.time() - start)
    notes = (f"{n} watermarked + {n} clean per cell (fewer than bench/watermark.py's 200: each exact detection of "
             f"the batch takes minutes here); {MODEL_LABEL}; generation '{PROMPT}' cfg {CFG:g}, detection empty "
             f"prompt cfg 1; rings channel {CHANNEL}, radius {RADIUS}. See the module docstring.")
    publish("watermark_trained", rows, summary, quick, notes, lambda path: plot(curves, path), COLUMNS)
    return summary
