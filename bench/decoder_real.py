"""Decoder inversion on a real trained autoencoder (`make bench SUITE=decoder_real [QUICK=1]`): FLUX.2's tiny
autoencoder taef2 (128 latent channels at 16x, ../shared/weights/taef2) loaded by ComfyUI 0.33's VAELoader.

Two parts, every method in a fresh process (peak memory above the loaded level, as bench/decoder.py measures it):
- photo: real photographs (scikit-image's astronaut, coffee, chelsea; scikit-learn's china, flower), centre
  crops resized to the size; PSNR of VAE Decode(latent) against the photo, wall time, peak memory. The
  encoder row is VAE Encode; the gradient baseline runs 100 iterations and returns its best iterate.
- protocol: the paper's evaluation, z0 = E(photo), target x = 8-bit D(z0); NMSE of the latent against z0.
Summary figures are medians over the photos of per-photo differences.
"""
import concurrent.futures
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
    """The photo part at `sizes`, the paper's protocol at `protocol_size`; above `all_methods_up_to` px only VAE
    Encode, the default and the gradient baseline run (CPU time). About 45 minutes with DECODER_REAL_JOBS=2 on
    two cores; QUICK a couple of minutes. low_precision_size None leaves out the 16-bit rows
    (tests/test_real_autoencoder_16bit.py measures them): fp16 convolutions on a CPU have no fast kernel."""
    low = int(os.environ.get("DECODER_REAL_LOW_PRECISION_SIZE", 0)) or None
    if quick:
        return dict(photos=list(PHOTOS)[:2], sizes=[64], protocol_size=64, gradient_iterations=10,
                    low_precision_size=low, all_methods_up_to=64)
    return dict(photos=list(PHOTOS), sizes=[256, 512], protocol_size=128, gradient_iterations=GRADIENT_ITERATIONS,
                low_precision_size=low, all_methods_up_to=256)


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
    import copy
    from inversion_ops.decoder import METHODS, checkpointed, hybrid_finish_dtype
    torch.set_num_threads(1)
    cfg = json.load(open(config_path))
    dtype = DTYPES[cfg["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_taef2().to(device)
    data = torch.load(cfg["inputs"])
    x, photo, z0 = data["x"].to(device), data["photo"].to(device), data.get("z0")
    run_model, knobs = model.to(dtype), cfg["knobs"]
    if cfg["method"] == "hybrid":   # as the node builds it: the finish through a checkpointed copy, bf16 if native
        finish_dtype = hybrid_finish_dtype(dtype, device, auto=dtype == torch.float32)   # fp32 rows: auto's
        finish = checkpointed(copy.deepcopy(model).to(finish_dtype) if finish_dtype != dtype else run_model)
        knobs = dict(knobs, finish_decode=finish.decode, finish_dtype=finish_dtype)
    with torch.no_grad():                                   # warm-up: kernels, allocator, workspaces
        run_model.encode(run_model.decode(run_model.encode(x[:1].to(dtype))))
    meter, start = PeakMemory(), time.perf_counter()
    z = METHODS[cfg["method"]](run_model.encode, run_model.decode, x, dtype=dtype, **knobs)
    seconds = time.perf_counter() - start
    peak = meter.peak_mb()
    with torch.no_grad():
        image = run_model.decode(z.to(dtype)).float().clamp(-1, 1)
    if "finish_dtype" in knobs:
        cfg["finish_dtype"] = str(knobs["finish_dtype"]).removeprefix("torch.")
    res = dict(cfg, seconds=seconds, peak_mem_mb=peak, psnr_db_per_photo=psnr_db(image, photo, peak=2.0).tolist())
    if z0 is not None:
        res["nmse_db_per_photo"] = nmse_db(z.cpu(), z0).tolist()
    res.pop("inputs")
    json.dump(res, open(out_path, "w"))


def run_worker(cfg, tmp):
    tmp = tempfile.mkdtemp(dir=tmp)   # jobs may run side by side
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


def differences(rows, a, b, key, sign=1.0):
    """sign * (a's per-photo `key` - b's) for every photo and size, rows keyed (size, label)."""
    return [sign * (p - q) for size, label in rows if label == a
            for p, q in zip(rows[size, a][key], rows[size, b][key])]


def summarise(rows, low):
    """PSNR and NMSE gains: medians over photos and sizes; time and memory ratios: the worst size's.
    Each photo-part figure also per size, suffixed _<size>px."""
    photo = {(r["size"], r["label"]): r for r in rows if r["part"] == "photo" and r["dtype"] == "fp32"}
    proto = {(r["size"], r["label"]): r for r in rows if r["part"] == "protocol"}
    sizes = sorted({size for size, _ in photo})
    key, median = "psnr_db_per_photo", statistics.median

    def photo_figures(rows_at):
        return dict(
            default_psnr_gain_vs_encoder_db=median(differences(rows_at, METHOD, "encoder", key)),
            gradient_psnr_gain_vs_encoder_db=median(differences(rows_at, "gradient", "encoder", key)),
            default_psnr_minus_gradient_db=median(differences(rows_at, METHOD, "gradient", key)),
            default_seconds_ratio_vs_gradient=max(rows_at[z, METHOD]["seconds"] / rows_at[z, "gradient"]["seconds"]
                                                  for z, label in rows_at if label == METHOD),
            default_memory_ratio_vs_gradient=max(rows_at[z, METHOD]["peak_mem_mb"] / rows_at[z, "gradient"][
                "peak_mem_mb"] for z, label in rows_at if label == METHOD))
    out = dict(default_method=METHOD, **photo_figures(photo),
               default_nmse_gain_vs_encoder_db=median(differences(proto, METHOD, "encoder", "nmse_db_per_photo", -1)),
               gradient_nmse_gain_vs_encoder_db=median(differences(proto, "gradient", "encoder", "nmse_db_per_photo",
                                                                   -1)))
    for size in sizes if len(sizes) > 1 else ():
        at = {k: r for k, r in photo.items() if k[0] == size}
        out.update({f"{name}_{size}px": v for name, v in photo_figures(at).items()})
    for p in ("fp16", "bf16") if low else ():
        lowp = {(r["size"], r["label"]): r for r in low if r["dtype"] == p}
        fp32 = {(r["size"], r["label"]): r for r in low if r["dtype"] == "fp32"}
        out[f"{p}_psnr_minus_fp32_db"] = median(a - b for (z, label), r in lowp.items() if label == METHOD
                                                for a, b in zip(r[key], fp32[z, METHOD][key]))
        out[f"{p}_psnr_minus_encoder_db"] = median(differences(lowp, METHOD, "encoder", key))
    for label in sorted({label for _, label in photo}):
        out[f"{label}_psnr_minus_gradient_db"] = median(differences(photo, label, "gradient", key))
    return out


def plot(rows, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = [r["size"] for r in rows if r["part"] == "photo"]
    for ax, part, key, unit in ((axes[0], "photo", "psnr_db_per_photo", "PSNR vs photo (dB)"),
                                (axes[1], "protocol", "nmse_db_per_photo", "latent NMSE vs E(photo) (dB)")):
        for r in (r for r in rows if r["part"] == part and r["dtype"] == "fp32"):
            ax.plot(r["seconds"], statistics.median(r[key]), "o" if r["size"] == min(sizes) else "s")
            ax.annotate(f"{r['label']} {r['size']}", (r["seconds"], statistics.median(r[key])), fontsize=7)
        ax.set(xscale="symlog", xlabel="seconds for all photos (1 CPU thread)", ylabel=f"median {unit}",
               title=f"taef2, {part} (label: method, px)")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def report(r):
    r["psnr_db"] = statistics.median(r["psnr_db_per_photo"])
    r["nmse_db"] = statistics.median(r["nmse_db_per_photo"]) if "nmse_db_per_photo" in r else None
    print(f"{r['part']:8s} {r['size']:4d} {r['label']:14s} {r['dtype']} PSNR {r['psnr_db']:6.2f} "
          f"NMSE {r['nmse_db'] or 0:7.2f} {r['seconds']:7.1f} s +{r['peak_mem_mb']:.0f} MiB", flush=True)
    return r


def hybrid_finish(rows):
    return ", ".join(sorted({r["finish_dtype"] for r in rows if "finish_dtype" in r})) or "-"


COLUMNS = ["part", "size", "label", "dtype", "psnr_db", "nmse_db", "seconds", "peak_mem_mb"]


def main(quick=False):
    torch.set_num_threads(1)
    s = settings(quick)
    parallel = max(1, int(os.environ.get("DECODER_REAL_JOBS", 1)))
    start, jobs = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(set(s["sizes"]) | {s["protocol_size"]} | ({s["low_precision_size"]} - {None})):
            inputs = make_inputs(s["photos"], size, tmp)
            parts = [p for p, sizes in (("protocol", [s["protocol_size"]]), ("photo", s["sizes"])) if size in sizes]
            chosen = [m for m in methods(quick, s["gradient_iterations"])
                      if size <= s["all_methods_up_to"] or m[0] in ("encoder", "gradient", METHOD)]
            jobs += [dict(part=part, size=size, label=label, method=m, knobs=k, dtype="fp32", inputs=inputs[part])
                     for part in parts for label, m, k in chosen]
            if size == s["low_precision_size"]:
                jobs += [dict(part="low", size=size, label=label, method=m, knobs=k, dtype=p, inputs=inputs["photo"])
                         for p in DTYPES for label, m, k in methods(quick, 0) if label in ("encoder", METHOD)]
        # the longest first (gradient at the largest size), so side-by-side jobs finish together
        order = sorted(range(len(jobs)), key=lambda i: (-jobs[i]["size"], jobs[i]["label"] != "gradient"))
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            done = dict(zip(order, pool.map(lambda i: report(run_worker(jobs[i], tmp)), order)))
    results = [done[i] for i in range(len(jobs))]
    rows, low = [r for r in results if r["part"] != "low"], [r for r in results if r["part"] == "low"]
    summary = summarise(rows, low)
    rows += low
    notes = (f"taef2 (FLUX.2's tiny autoencoder, trained weights) loaded by ComfyUI 0.33's VAELoader, float32 "
             f"unless dtype says, CPU, 1 thread per method process, {parallel} method "
             f"processes side by side. Photos {s['photos']} (scikit-image, "
             f"scikit-learn), centre crops: the photo part at {s['sizes']} px (above {s['all_methods_up_to']} px only "
             f"encoder, gradient and {METHOD}), the paper's protocol at "
             f"{s['protocol_size']} px. Methods at the node's defaults (max_iterations {MAX_ITERATIONS}, tolerance "
             f"{TOLERANCE:g}; hybrid tolerance 0, its finish in {hybrid_finish(rows)}), gradient "
             f"{s['gradient_iterations']} iterations, best iterate. 16-bit rows (part low) at "
             f"{s['low_precision_size']} px. Memory = peak RSS above the loaded level. Summary: PSNR/NMSE gains are "
             f"medians over photos and sizes, time and memory ratios the worst size's. Suite wall time "
             f"{time.time() - start:.0f} s.")
    publish("decoder_real", rows, summary, quick, notes, lambda path: plot(rows, path), COLUMNS)
    return summary


if __name__ == "__main__":   # run_worker's processes
    worker(sys.argv[1], sys.argv[2])
