"""Decoder inversion on a real trained autoencoder (`make bench SUITE=decoder_real [QUICK=1]`): FLUX.2's tiny
autoencoder taef2 (128 latent channels at 16x, ../shared/weights/taef2) loaded by ComfyUI 0.33's VAELoader.

Two parts, every method in a fresh process (peak memory above the loaded level, as bench/decoder.py measures it):
- photo: real photographs (scikit-image's astronaut, coffee, chelsea; scikit-learn's china, flower), centre
  crops resized to the size; PSNR of VAE Decode(latent) against the photo, wall time, peak memory. The
  encoder row is VAE Encode; the gradient baseline runs 100 iterations and returns its best iterate.
- protocol: the paper's evaluation, z0 = E(photo), target x = 8-bit D(z0); NMSE of the latent against z0.
Summary figures are medians over the photos of per-photo differences.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import REPO, PeakMemory, publish, pyplot, save_figure
from inversion_ops.decoder import DEFAULT_STEP, MAX_ITERATIONS, METHOD, STEP_OPTION, TOLERANCE
from tests.support.metrics import nmse_db, psnr_db

PHOTOS = {"astronaut": ("skimage", "data/astronaut.png"), "coffee": ("skimage", "data/coffee.png"),
          "chelsea": ("skimage", "data/chelsea.png"), "china": ("sklearn", "datasets/images/china.jpg"),
          "flower": ("sklearn", "datasets/images/flower.jpg")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRADIENT_ITERATIONS = 100


def settings(quick):
    """Sizes chosen so the full run fits about half an hour on a 2-core CPU; QUICK a couple of minutes.
    low_precision_size None leaves out the 16-bit rows: fp16 convolutions on this CPU have no fast kernel."""
    low = int(os.environ.get("DECODER_REAL_LOW_PRECISION_SIZE", 0)) or None
    if quick:
        return dict(photos=list(PHOTOS)[:2], sizes=[64], gradient_iterations=10, low_precision_size=low)
    return dict(photos=list(PHOTOS), sizes=[128], gradient_iterations=GRADIENT_ITERATIONS, low_precision_size=low)


def methods(quick, gradient_iterations):
    """(label, method, knobs): each at the node's defaults, the gradient baseline at its own 100 iterations."""
    node = dict(max_iterations=MAX_ITERATIONS, tolerance=TOLERANCE)
    out = [("encoder", "encoder", {}),
           ("gradient", "gradient", dict(max_iterations=gradient_iterations, lr=DEFAULT_STEP["gradient"]))]
    for m in ("forward_step", "momentum", "adam_residual", "hybrid"):
        knobs = dict(node, **{STEP_OPTION[m]: DEFAULT_STEP[m]})
        out.append((m, m, dict(knobs, tolerance=0.0) if m == "hybrid" else knobs))
    return out


def photo_path(name):
    package, path = PHOTOS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f"bench decoder_real needs the {package} package for its photo {name!r} "
                           f"(tools/requirements-test.txt)")
    return os.path.join(spec.submodule_search_locations[0], path)


def load_photos(names, size):
    """(B, 3, size, size) in [-1, 1]: centre square crops, Lanczos-resized, 8-bit values."""
    from PIL import Image
    out = []
    for name in names:
        im = Image.open(photo_path(name)).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.LANCZOS)
        out.append(np.asarray(im, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) * 2 - 1


def load_taef2():
    """taef2's model as ComfyUI 0.33's VAELoader builds it, on a private float32 copy autograd can use."""
    import copy
    from tests.support.comfy_runtime import put_comfyui_on_path
    from tests.support.real_weights import register_taef2, taef2_missing_reason
    if taef2_missing_reason():
        raise RuntimeError(taef2_missing_reason())
    put_comfyui_on_path()
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import nodes
    with torch.inference_mode():
        vae = nodes.VAELoader().load_vae(register_taef2())[0]
    model = copy.deepcopy(vae.first_stage_model).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantise(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def worker(config_path, out_path):
    from inversion_ops.decoder import METHODS, checkpointed
    torch.set_num_threads(1)
    cfg = json.load(open(config_path))
    dtype = DTYPES[cfg["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_taef2().to(device)
    data = torch.load(cfg["inputs"])
    x, photo, z0 = data["x"].to(device), data["photo"].to(device), data.get("z0")
    run_model = model.to(dtype)
    if cfg["method"] == "hybrid":
        run_model = checkpointed(run_model)
    with torch.no_grad():                                   # warm-up: kernels, allocator, workspaces
        run_model.encode(run_model.decode(run_model.encode(x[:1].to(dtype))))
    meter, start = PeakMemory(), time.perf_counter()
    z = METHODS[cfg["method"]](run_model.encode, run_model.decode, x, dtype=dtype, **cfg["knobs"])
    seconds = time.perf_counter() - start
    peak = meter.peak_mb()
    with torch.no_grad():
        image = run_model.decode(z.to(dtype)).float().clamp(-1, 1)
    res = dict(cfg, seconds=seconds, peak_mem_mb=peak, psnr_db_per_photo=psnr_db(image, photo, peak=2.0).tolist())
    if z0 is not None:
        res["nmse_db_per_photo"] = nmse_db(z.cpu(), z0).tolist()
    res.pop("inputs")
    json.dump(res, open(out_path, "w"))


def run_worker(cfg, tmp):
    cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "out.json")
    json.dump(cfg, open(cfg_path, "w"))
    proc = subprocess.run([sys.executable, "-m", "bench.decoder_real", cfg_path, out_path], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['label']} failed:\n{proc.stderr[-3000:]}")
    return json.load(open(out_path))


def make_inputs(names, size, tmp):
    """photo part: x = the photo; protocol part: z0 = E(photo), x = 8-bit D(z0). Saved per part."""
    model = load_taef2()
    photo = load_photos(names, size)
    with torch.no_grad():
        z0 = model.encode(photo)
        decoded = quantise(model.decode(z0))
    paths = {"photo": os.path.join(tmp, f"photo_{size}.pt"), "protocol": os.path.join(tmp, f"protocol_{size}.pt")}
    torch.save(dict(x=photo, photo=photo), paths["photo"])
    torch.save(dict(x=decoded, photo=decoded, z0=z0), paths["protocol"])
    return paths


def median_gain(rows, a, b, key, sign=1.0):
    """Median over photos of sign * (a's per-photo `key` - b's), a and b rows."""
    return statistics.median(sign * (p - q) for p, q in zip(rows[a][key], rows[b][key]))


def summarise(rows, low):
    photo = {r["label"]: r for r in rows if r["part"] == "photo" and r["dtype"] == "fp32"}
    proto = {r["label"]: r for r in rows if r["part"] == "protocol"}
    key = "psnr_db_per_photo"
    out = dict(
        default_method=METHOD,
        default_psnr_gain_vs_encoder_db=median_gain(photo, METHOD, "encoder", key),
        gradient_psnr_gain_vs_encoder_db=median_gain(photo, "gradient", "encoder", key),
        default_psnr_minus_gradient_db=median_gain(photo, METHOD, "gradient", key),
        default_seconds_ratio_vs_gradient=photo[METHOD]["seconds"] / photo["gradient"]["seconds"],
        default_memory_ratio_vs_gradient=photo[METHOD]["peak_mem_mb"] / photo["gradient"]["peak_mem_mb"],
        default_nmse_gain_vs_encoder_db=median_gain(proto, METHOD, "encoder", "nmse_db_per_photo", -1.0),
        gradient_nmse_gain_vs_encoder_db=median_gain(proto, "gradient", "encoder", "nmse_db_per_photo", -1.0),
    )
    for p in ("fp16", "bf16") if low else ():
        lowp = {r["label"]: r for r in low if r["dtype"] == p}
        fp32 = {r["label"]: r for r in low if r["dtype"] == "fp32"}
        out[f"{p}_psnr_minus_fp32_db"] = statistics.median(
            a - b for a, b in zip(lowp[METHOD][key], fp32[METHOD][key]))
        out[f"{p}_psnr_minus_encoder_db"] = median_gain(lowp, METHOD, "encoder", key)
    for label in photo:
        out[f"{label}_psnr_minus_gradient_db"] = median_gain(photo, label, "gradient", key)
    return out


def plot(rows, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, part, key, unit in ((axes[0], "photo", "psnr_db_per_photo", "PSNR vs photo (dB)"),
                                (axes[1], "protocol", "nmse_db_per_photo", "latent NMSE vs E(photo) (dB)")):
        for r in (r for r in rows if r["part"] == part and r["dtype"] == "fp32"):
            ax.plot(r["seconds"], statistics.median(r[key]), "o", label=r["label"])
            ax.annotate(r["label"], (r["seconds"], statistics.median(r[key])), fontsize=7)
        ax.set(xscale="symlog", xlabel="seconds for all photos (1 CPU thread)", ylabel=f"median {unit}",
               title=f"taef2, {part}")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


COLUMNS = ["part", "size", "label", "dtype", "psnr_db", "nmse_db", "seconds", "peak_mem_mb"]


def main(quick=False):
    torch.set_num_threads(1)
    s = settings(quick)
    rows, low, start = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(set(s["sizes"]) | ({s["low_precision_size"]} - {None})):
            inputs = make_inputs(s["photos"], size, tmp)
            jobs = []
            if size in s["sizes"]:
                jobs += [(part, label, m, k, "fp32") for part in ("photo", "protocol")
                         for label, m, k in methods(quick, s["gradient_iterations"])]
            if size == s["low_precision_size"]:
                jobs += [("low", label, m, k, p) for p in DTYPES for label, m, k in methods(quick, 0)
                         if label in ("encoder", METHOD)]
            for part, label, method, knobs, dtype in jobs:
                cfg = dict(part=part, size=size, label=label, method=method, knobs=knobs, dtype=dtype,
                           inputs=inputs["photo" if part == "low" else part])
                r = run_worker(cfg, tmp)
                r["psnr_db"] = statistics.median(r["psnr_db_per_photo"])
                r["nmse_db"] = statistics.median(r["nmse_db_per_photo"]) if "nmse_db_per_photo" in r else None
                (low if part == "low" else rows).append(r)
                print(f"{part:8s} {size:4d} {label:14s} {dtype} PSNR {r['psnr_db']:6.2f} NMSE {r['nmse_db'] or 0:7.2f} "
                      f"{r['seconds']:7.1f} s +{r['peak_mem_mb']:.0f} MiB", flush=True)
    summary = summarise([r for r in rows if r["size"] == s["sizes"][0]], low)
    rows += low
    notes = (f"taef2 (FLUX.2's tiny autoencoder, trained weights) loaded by ComfyUI 0.33's VAELoader, float32 "
             f"unless dtype says, CPU, 1 thread per method process. Photos {s['photos']} (scikit-image, "
             f"scikit-learn), centre crops at {s['sizes']} px. Methods at the node's defaults (max_iterations "
             f"{MAX_ITERATIONS}, tolerance {TOLERANCE:g}; hybrid tolerance 0), gradient {s['gradient_iterations']} "
             f"iterations, best iterate. 16-bit rows (part low) at {s['low_precision_size']} px. Memory = peak "
             f"RSS above the loaded level. Summary: medians over photos. Suite wall time {time.time() - start:.0f} s.")
    publish("decoder_real", rows, summary, quick, notes, lambda path: plot(rows, path), COLUMNS)
    return summary


if __name__ == "__main__":   # run_worker's processes
    worker(sys.argv[1], sys.argv[2])
