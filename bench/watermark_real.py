"""`make bench SUITE=watermark_real [QUICK=1]`: Tree-Ring detection through images decoded and re-encoded by a REAL
autoencoder, FLUX.2's tiny one (taef2), on the trained tiny FLUX.2-layout model, in ComfyUI 0.33 in-process.

  model      tiny_flux2_trained (models/README.md: FLUX.2-layout transformer trained on taef2 latents of 20 emoji
             captions) by UNETLoader, the tiny CLIP-L by CLIPLoader, taef2 by VAELoader; CPU, float32;
             256 px images, packed 128-channel 16x16 latents
  generation FLUX.2's recipe: the 20 captions in turn, FluxGuidance 4, cfg 1 (BasicGuider's path through
             nodes.sampling.run_sampler), euler, 'simple' schedule; watermarked: Tree-Ring Noise (rings on one
             channel of the 128, one key); clean: ComfyUI's seeded noise (another seed)
  routes     latent: the generated latent itself; vae_encode: VAE Decode -> 8-bit image -> attack -> VAE Encode;
             decoder_inversion: the same image through Decoder Inversion (its defaults)
  attacks    none (the 8-bit image); jpeg75 (bench/watermark.attack)
  detection  Tree-Ring Detect's path as a detecting user has it: an empty prompt (with FluxGuidance 4) at cfg 1,
             naive (FlipSigmas + euler) or exact (Invert Latent's inverter), inversion_ops.watermark.detect
Per cell: AUC, TPR at 1% FPR (threshold from the clean set), the clean set's rate at p < 1%, seconds and model calls
per detection (the batch is inverted at once).
"""
import tempfile
import time

import torch

from bench.common import publish
from bench.watermark import detection_stats
from bench.watermark_trained import encode_route, plot

SAMPLER, STEPS, SCHEDULER, SIZE = "euler", 10, "simple", 256
CHANNEL, RADIUS, KEY = 14, 5, 20231   # channel 14: see docs/results.md#watermark-real
SEEDS = {"marked": 7, "clean": 100}
CELLS = [("latent", "none"), ("vae_encode", "none"), ("decoder_inversion", "none"), ("vae_encode", "jpeg75"),
         ("decoder_inversion", "jpeg75")]
QUICK_CELLS = [("latent", "none"), ("vae_encode", "none"), ("vae_encode", "jpeg75")]
COLUMNS = ("sampler", "steps", "route", "attack", "method", "auc", "tpr_at_1fpr", "clean_fpr_at_p01",
           "seconds_per_detection", "model_calls_per_detection")
MODEL_LABEL = ("trained tiny FLUX.2-layout transformer (models/tiny_flux2_trained.safetensors, emoji) + taef2 (FLUX.2's real tiny "
               "autoencoder), float32, CPU, ComfyUI 0.33")
# the summary's names for the routes the issue asks about
SUMMARY_CELLS = {"image": ("vae_encode", "none"), "jpeg75": ("vae_encode", "jpeg75"),
                 "latent": ("latent", "none"), "decoder_inversion": ("decoder_inversion", "none"),
                 "jpeg75_decoder_inversion": ("decoder_inversion", "jpeg75")}


def prompts(clip, n):
    """The 20 captions in turn as one conditioning batch of n, and the empty prompt, both with FluxGuidance."""
    from tests.support.flux2 import flux2_conditioning
    from tools.train_models import EVAL_CAPTIONS
    conds = [flux2_conditioning(clip, c) for c in EVAL_CAPTIONS]
    batch = torch.cat([conds[i % len(conds)][0][0] for i in range(n)])
    return [[batch, dict(conds[0][0][1])]], flux2_conditioning(clip, "")


def generate(runtime, model, positive, empty, n):
    import comfy.sample
    import comfy.samplers
    sampling, wm_nodes = runtime.pack_module("nodes.sampling"), runtime.pack_module("nodes.watermark")
    zero = torch.zeros(n, 128, SIZE // 16, SIZE // 16)
    noise = {"marked": wm_nodes.TreeRingNoiseObject(SEEDS["marked"], KEY, CHANNEL, RADIUS).generate_noise(
                 {"samples": zero}),
             "clean": comfy.sample.prepare_noise(zero, SEEDS["clean"], None)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER, STEPS).cpu().float()
    with torch.inference_mode():
        return sigmas, {kind: sampling.run_sampler(model, positive, empty, 1.0, {"samples": zero},
                                                   comfy.samplers.sampler_object(SAMPLER), sigmas,
                                                   noise=noise[kind])["samples"] for kind in noise}


def detect_cell(runtime, model, empty, encoded, sigmas, method):
    """(detections per set, seconds, model calls) of Tree-Ring Detect's inversion on both sets."""
    sampling, exact_nodes = runtime.pack_module("nodes.sampling"), runtime.pack_module("nodes.exact")
    wm_nodes, watermark = runtime.pack_module("nodes.watermark"), runtime.pack_module("inversion_ops.watermark")
    log, detections, start = runtime.pack_module("inversion_ops.common").StepLog(), {}, time.perf_counter()
    for kind, z in encoded.items():
        with torch.inference_mode():
            inverted = sampling.invert_whole_latent(model, empty, empty, 1.0, {"samples": z},
                                                    exact_nodes.inversion_sampler(SAMPLER, method, log=log),
                                                    sigmas.flip(0))["samples"]
        detections[kind] = watermark.detect(wm_nodes.unit_noise(model, inverted, sigmas[0]), KEY, CHANNEL, RADIUS)
    return detections, time.perf_counter() - start, log.model_calls


def run(runtime, n, cells):
    from bench.common import markdown_table
    from tests.support.flux2 import load_flux2
    model, clip, vae = load_flux2(trained=True)
    positive, empty = prompts(clip, n)
    sigmas, latents = generate(runtime, model, positive, empty, n)
    rows, curves = [], {}
    for route, attack_name in cells:
        encoded, encode_seconds = encode_route(runtime.pack_module("nodes.decoder"), vae, latents, route, attack_name)
        for method in ("naive", "exact"):
            detections, seconds, calls = detect_cell(runtime, model, empty, encoded, sigmas, method)
            stats, curves[(SAMPLER, route, attack_name, method)] = detection_stats(
                detections, seconds + encode_seconds, calls, n, 3)
            rows.append(dict(sampler=SAMPLER, steps=STEPS, route=route, attack=attack_name, method=method, **stats))
            print(markdown_table(rows[-1:], COLUMNS, floatfmt="{:g}").splitlines()[-1], flush=True)
    return rows, curves


def summarize(rows, seconds):
    summary = {"model": MODEL_LABEL, "case": {"sampler": SAMPLER, "steps": STEPS, "size_px": SIZE,
                                              "channel": CHANNEL, "radius": RADIUS}}
    for name, (route, attack_name) in SUMMARY_CELLS.items():
        for r in rows:
            if (r["route"], r["attack"]) == (route, attack_name):
                summary[f"auc_{name}_{r['method']}"] = r["auc"]
                summary[f"tpr_at_1fpr_{name}_{r['method']}"] = r["tpr_at_1fpr"]
    summary["seconds"] = round(seconds, 1)
    return summary


def main(quick=False):
    from tests.support.comfy_runtime import InProcessComfy
    from tests.support.flux2 import flux2_missing_reason
    torch.set_num_threads(1)
    n, cells, start = (8, QUICK_CELLS, time.time()) if quick else (64, CELLS, time.time())
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        if flux2_missing_reason():      # ComfyUI 0.3.75, or no taef2 in ../shared
            print(f"skipped: {flux2_missing_reason()}")
            return {}
        rows, curves = run(runtime, n, cells)
    summary = summarize(rows, time.time() - start)
    notes = (f"{n} watermarked + {n} clean per cell; {MODEL_LABEL}; generation: the 20 captions in turn, "
             f"FluxGuidance 4, cfg 1, {SAMPLER} {STEPS} steps; detection: empty prompt, cfg 1; rings channel "
             f"{CHANNEL}, radius {RADIUS}, {SIZE} px. See the module docstring.")
    publish("watermark_real", rows, summary, quick, notes,
            lambda path: plot(curves, path, "Tree-Ring detection ROC through taef2 on the trained tiny FLUX.2-layout "
                                             "model (cfg 1 generation and detection, empty prompt)"), COLUMNS)
    return summary
