"""`make bench SUITE=watermark [QUICK=1]`: Tree-Ring detection (inversion_ops.watermark) through naive and exact
inversion, under image attacks, on the ANALYTIC model (no ComfyUI, no trained diffusion model):

  model      EPS Gaussian mixture (tests/support/analytic.py), latents 4x16x16, karras sigmas (SD1.5's range);
             generation with cfg 5 between two mixtures (cfg_denoiser); detection with the "empty prompt at
             cfg 1" of the paper: the unconditional mixture alone
  watermark  rings on channel 3, radius 5 (the 16x16 analogue of the paper's radius 10 on 64x64), one key for
             the watermarked set; the clean set starts from plain Gaussian noise
  images     LinearVAE (decode z -> A z + b, 3x64x64, encode = its exact left inverse), shown to the attacks as
             8-bit pixels 0.5 + (x - 0.5) / 4 clamped to [0, 1] (the decode's spread is about 4x [0, 1]'s)
  attacks    none, JPEG 75, 75% random crop + resize back, Gaussian blur sigma 1 px, Gaussian noise sigma 0.05,
             brightness x1.3 (PIL, on the 8-bit pixels)
  methods    naive (FlipSigmas + euler), exact (as Invert Latent: backward Euler for euler, shooting for dpmpp_2m).
             "exact + decoder inversion" equals exact here: the LinearVAE's encoder is already its decoder's
             exact left inverse, so it is not run separately
  samplers   euler 50 steps and dpmpp_2m 10 steps
Scores: the p-value of inversion_ops.watermark.detect (ranked by the correlation with the key, which orders
the same way and does not saturate at p = 0). Per cell: AUC, TPR at 1% FPR (threshold from the clean set),
the clean set's false-positive rate at the nominal p < 1%, seconds and model calls per detection.
Also the wrong-key rate: exact noise of images watermarked with other random keys, detected with this key.
"""
import io
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from bench.common import find_row, markdown_table, publish, pyplot, save_figure
from inversion_ops import exact, multistep, watermark
from inversion_ops.common import StepLog
from tests.support.analytic import GaussianMixtureDenoiser, LinearVAE, cfg_denoiser
from tests.support.reference_samplers import BASE_SHOOTING_RUNS, sample_dpmpp_2m, sample_euler
from tests.support.schedules import karras_sigmas

SHAPE, CHANNEL, RADIUS, KEY, CFG = (4, 16, 16), 3, 5, 20231, 5.0
PIXEL_SPREAD = 4.0
ATTACKS = ("none", "jpeg75", "crop75", "blur1", "noise005", "bright13")
SAMPLERS = {"euler": 50, "dpmpp_2m": 10}
COLUMNS = ("sampler", "steps", "method", "attack", "auc", "tpr_at_1fpr", "clean_fpr_at_p01", "seconds_per_detection",
           "model_calls_per_detection")


def to_pixels(vae, z):
    x = vae.decode(z)
    return ((0.5 + (x - 0.5) / PIXEL_SPREAD).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_pixels(vae, pixels):
    x = torch.from_numpy(pixels.astype(np.float64) / 255).permute(0, 3, 1, 2)
    return vae.encode(0.5 + (x - 0.5) * PIXEL_SPREAD)


def attack(pixels, name, rng):
    """One attack on uint8 images (B, H, W, 3), PIL as the Tree-Ring paper applies them."""
    out = []
    for image in pixels:
        im = Image.fromarray(image)
        w, h = im.size
        if name == "jpeg75":
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=75)
            im = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        elif name == "crop75":   # 75% of the area, random place, resized back
            cw, ch = round(w * 0.75 ** 0.5), round(h * 0.75 ** 0.5)
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        elif name == "blur1":
            im = im.filter(ImageFilter.GaussianBlur(radius=1))
        elif name == "noise005":
            noisy = np.asarray(im, dtype=np.float64) / 255 + rng.normal(0, 0.05, (h, w, 3))
            im = Image.fromarray((noisy.clip(0, 1) * 255).round().astype(np.uint8))
        elif name == "bright13":
            im = ImageEnhance.Brightness(im).enhance(1.3)
        out.append(np.asarray(im))
    return np.stack(out)


def inverters(sampler):
    if sampler == "euler":
        return {"naive": (exact.naive_inversion, {}), "exact": (exact.exact_inversion_euler, {})}
    # dpmpp_2m: shooting through the sampler's own arithmetic, as Invert Latent inverts it (without ComfyUI:
    # the runs that need no ComfyUI step code)
    return {"naive": (exact.naive_inversion, {}),
            "exact": (multistep.exact_inversion_shooting, {"sample": sample_dpmpp_2m, "runs": BASE_SHOOTING_RUNS})}


def roc(clean, marked):
    """(AUC, TPR at 1% FPR, fpr, tpr) for scores where higher = watermarked."""
    auc = float((marked[:, None] > clean[None, :]).double().mean() + 0.5 * (marked[:, None] == clean[None, :]).double().mean())
    threshold = torch.quantile(clean, 0.99)
    tpr = float((marked > threshold).double().mean())
    thresholds = torch.cat([torch.tensor([float("inf")]), torch.sort(torch.cat([clean, marked]), descending=True).values])
    fpr_curve = [float((clean >= t).double().mean()) for t in thresholds]
    tpr_curve = [float((marked >= t).double().mean()) for t in thresholds]
    return auc, tpr, fpr_curve, tpr_curve


def detection_stats(detections, seconds, calls, n, seconds_digits):
    """One cell's row fields from watermark.detect's results on the clean and marked sets, and its ROC curve
    (fpr, tpr)."""
    auc, tpr, fpr_curve, tpr_curve = roc(detections["clean"]["correlation"], detections["marked"]["correlation"])
    return dict(auc=round(auc, 4), tpr_at_1fpr=round(tpr, 4),
                clean_fpr_at_p01=round(float((detections["clean"]["p_value"] < 0.01).double().mean()), 4),
                seconds_per_detection=round(seconds / (2 * n), seconds_digits),
                model_calls_per_detection=round(calls / 2, 1), n_clean=n, n_marked=n), (fpr_curve, tpr_curve)


def run(quick):
    torch.set_num_threads(1)
    n = 50 if quick else 200
    attacks = ATTACKS[:2] if quick else ATTACKS
    cond = GaussianMixtureDenoiser.random(shape=SHAPE, weights=[0.6, 0.3, 0.1])
    uncond = GaussianMixtureDenoiser.random(shape=SHAPE, weights=[0.2, 0.3, 0.5])
    generate_with, detect_with = cfg_denoiser(cond, uncond, CFG), uncond   # the paper's empty prompt at cfg 1
    vae = LinearVAE(latent_shape=SHAPE, scale=4)
    g = torch.Generator().manual_seed(0)
    clean_noise = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    marked_noise = watermark.embed_rings(torch.randn(n, *SHAPE, generator=g, dtype=torch.float64), KEY, CHANNEL, RADIUS)
    rows, curves = [], {}
    for sampler, steps in (SAMPLERS if not quick else {"dpmpp_2m": 10}).items():
        sigmas = karras_sigmas(steps)
        sample = sample_euler if sampler == "euler" else sample_dpmpp_2m
        latents = {kind: sample(generate_with, sigmas[0] * noise, sigmas)
                   for kind, noise in (("clean", clean_noise), ("marked", marked_noise))}
        for name in attacks:
            rng = np.random.default_rng(1)   # the same crops / noise for both sets
            attacked = {kind: from_pixels(vae, attack(to_pixels(vae, z), name, rng)) for kind, z in latents.items()}
            for method, (invert, options) in inverters(sampler).items():
                detections, calls, seconds = {}, 0, 0.0
                for kind, z in attacked.items():
                    log = StepLog()
                    start = time.perf_counter()
                    noise = invert(detect_with, z, sigmas.flip(0), callback=log, **options) / sigmas[0]
                    detections[kind] = watermark.detect(noise, KEY, CHANNEL, RADIUS)
                    seconds += time.perf_counter() - start
                    calls += log.model_calls
                stats, curves[(sampler, method, name)] = detection_stats(detections, seconds, calls, n, 4)
                rows.append(dict(sampler=sampler, steps=steps, method=method, attack=name, **stats))
                print(markdown_table(rows[-1:], COLUMNS, floatfmt="{:g}").splitlines()[-1], flush=True)
    return rows, curves, n


def wrong_key_rate(pairs):
    """Share of images watermarked with random other keys (noise recovered exactly) detected with KEY at p < 1%."""
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(pairs, *SHAPE, generator=g, dtype=torch.float64)
    marked = torch.cat([watermark.embed_rings(noise[i:i + 1], 10_000 + i, CHANNEL, RADIUS) for i in range(pairs)])
    return float((watermark.detect(marked, KEY, CHANNEL, RADIUS)["p_value"] < 0.01).double().mean())


def plot(curves, path):
    plt = pyplot()
    attacks = sorted({a for _, _, a in curves}, key=ATTACKS.index)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.6), squeeze=False)
    styles = {"naive": "--", "exact": "-"}
    colours = {"euler": "tab:blue", "dpmpp_2m": "tab:red"}
    for ax, name in zip(axes.flat, attacks):
        for (sampler, method, attack_name), (fpr, tpr) in curves.items():
            if attack_name == name:
                ax.plot(fpr, tpr, styles[method], color=colours[sampler], label=f"{sampler} {method}")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.axvline(0.01, color="grey", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Tree-Ring detection ROC, analytic Gaussian-mixture model + LinearVAE (not a trained diffusion model)",
                 fontsize=9)
    save_figure(fig, path, dpi=100)


def main(quick=False):
    start = time.time()
    rows, curves, n = run(quick)
    case = dict(sampler="dpmpp_2m", steps=10)
    get = lambda method, attack_name, key: (find_row(rows, **case, method=method, attack=attack_name) or {}).get(key)
    naive_tpr, exact_tpr = get("naive", "none", "tpr_at_1fpr"), get("exact", "none", "tpr_at_1fpr")
    summary = {
        "model": "analytic EPS Gaussian mixture 4x16x16 + LinearVAE 3x64x64 (no trained diffusion model), float64, CPU",
        "case": case,
        "auc_clean_exact": get("exact", "none", "auc"),
        "tpr_at_1fpr_clean_exact": exact_tpr,
        "tpr_at_1fpr_gain_exact_vs_naive_dpmpp_2m_10": (round(100 * (exact_tpr - naive_tpr), 1)
                                                        if exact_tpr is not None and naive_tpr is not None else None),
        "auc_jpeg75_exact": get("exact", "jpeg75", "auc"),
        "clean_fpr_at_nominal_1pct_exact": get("exact", "none", "clean_fpr_at_p01"),
        "wrong_key_detection_rate": wrong_key_rate(50 if quick else 200),
        "seconds": round(time.time() - start, 1),
    }
    notes = (f"{n} watermarked + {n} clean per cell; analytic model (bench/watermark.py docstring), labelled: not "
             f"a trained model (bench/watermark_trained.py runs one) nor the random-weight ones (they generate "
             f"white-noise latents). Detection: unconditional mixture at cfg 1 (the paper's empty prompt); "
             f"generation cfg {CFG}. Summary keys on dpmpp_2m 10 steps. CPU, 1 thread, float64.")
    publish("watermark", rows, summary, quick, notes, lambda path: plot(curves, path), COLUMNS)
    return summary
