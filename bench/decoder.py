"""Decoder inversion benchmark (`make bench SUITE=decoder [QUICK=1]`).

For each VAE, on real photos quantised to 8 bit (tests/data/photo_*_256.jpg, held out from the tiny
VAE's training): the ground truth z0 = E(x_real) and the target x = quantise(D(z0)), then every method
recovers z from x alone. Each method runs in a fresh subprocess, so its peak memory is measured from
the level reached once the model and inputs are loaded (and one warm-up E(D(.)) done): on CPU the
peak RSS above that level (VmHWM reset through /proc/self/clear_refs), on a GPU
torch.cuda.max_memory_allocated above the allocated level.

VAEs: the trained tiny TAESD (models/tiny_taesd_trained.safetensors, loaded by comfy.sd.VAE) and a
ComfyUI AutoencoderKL (SD-style KL-f8 layout, 4 latent channels, via comfy.sd.VAE) with RANDOM
weights at reduced width (see KL_WIDTH), for which E is not a left-inverse of D: its numbers show cost
and behaviour on a deep KL network, not the accuracy a trained SD VAE would give.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import REPO, PeakMemory, markdown_table, pyplot, result_path, save_figure, write_results
from bench.decoder_methods import reconstruction_psnr, run_method, time_to_reach
from inversion_ops.decoder import DEFAULT_STEP, MOMENTUM, STEP_OPTION, TOLERANCE

PHOTOS = ["photo_chelsea_256.jpg", "photo_coffee_256.jpg", "photo_china_256.jpg"]
TRAINED = os.path.join(REPO, "models", "tiny_taesd_trained.safetensors")
KL_WIDTH = 32          # ch of the random KL VAE (SD's is 128: 16x the convolution cost)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_FREE = ("forward_step", "momentum", "adam_residual")


def settings(quick):
    """Sizes: chosen so the full suite stays near 15 minutes on a 2-core CPU shared with other jobs."""
    if quick:
        return dict(models={"tiny_taesd_trained": 64, "kl_f8_ch32_random": 32}, batch=1, max_iterations=8)
    return dict(models={"tiny_taesd_trained": 256, "kl_f8_ch32_random": 64}, batch=2, max_iterations=20)


def methods(max_iterations):
    """(label, method, dtype, knobs): the gradient-free ones with the node's defaults and tolerance.
    dtype is the one the VAE runs in; the latent being updated is float32 in every row."""
    free = dict(max_iterations=max_iterations, tolerance=TOLERANCE)
    step = {m: {STEP_OPTION[m]: DEFAULT_STEP[m]} for m in STEP_OPTION}
    return [
        ("encoder", "encoder", "fp32", {}),
        ("gradient", "gradient", "fp32", dict(max_iterations=max_iterations, **step["gradient"])),
        ("adam_residual", "adam_residual", "fp32", dict(free, **step["adam_residual"])),
        ("forward_step", "forward_step", "fp32", dict(free, **step["forward_step"])),
        ("momentum", "momentum", "fp32", dict(free, alpha=MOMENTUM, **step["momentum"])),
        ("forward_step fp16", "forward_step", "fp16", dict(free, **step["forward_step"])),
        ("forward_step bf16", "forward_step", "bf16", dict(free, **step["forward_step"])),
    ]


# ---------------------------------------------------------------------------------------------
# Models (ComfyUI's own classes, loaded through comfy.sd.VAE) and inputs


def import_comfy():
    from tests.support.comfy_runtime import put_comfyui_on_path
    put_comfyui_on_path()
    import comfy.cli_args
    comfy.cli_args.args.cpu = torch.cuda.is_available() is False
    import comfy.sd
    import comfy.utils
    return comfy


def build_vae(name):
    """A comfy.sd.VAE, weights as ComfyUI loads them; the random KL is seeded, so every process builds it alike."""
    comfy = import_comfy()
    if name == "tiny_taesd_trained":
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(TRAINED))
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": KL_WIDTH, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    for m in model.modules():          # ComfyUI's ops skip initialisation: PyTorch's defaults
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def load_photos(size, batch):
    from PIL import Image
    images = []
    for name in PHOTOS[:batch]:
        im = Image.open(os.path.join(REPO, "tests", "data", name)).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.LANCZOS)
        images.append(np.asarray(im, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)     # (B, 3, H, W), 8-bit values in [0, 1]


def quantise01(x):
    return (x.clamp(0, 1) * 255).round() / 255


def make_inputs(name, size, batch, path):
    """z0 = E(x_real) and x = quantise(D(z0)), in the model's [-1, 1] pixel space, fp32; saved to path."""
    vae = build_vae(name)
    model = vae.first_stage_model.float()
    x_real = load_photos(size, batch) * 2 - 1
    with torch.no_grad():
        z0 = model.encode(x_real)
        x = quantise01((model.decode(z0) + 1) / 2) * 2 - 1
        etd = model.encode(model.decode(z0)) - z0           # how far E is from a left-inverse of D
    info = dict(params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3), latent=list(z0.shape),
                etd_rel=(etd.flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)).mean().item())
    torch.save(dict(z0=z0, x=x), path)
    return info


# ---------------------------------------------------------------------------------------------
# One method in a fresh process


def worker(config_path, out_path):
    torch.set_num_threads(1)
    cfg = json.load(open(config_path))
    dtype = DTYPES[cfg["dtype"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = build_vae(cfg["model"])
    model = vae.first_stage_model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = torch.load(cfg["inputs"])
    x, z0 = data["x"].to(device), data["z0"].to(device)
    with torch.no_grad():                                   # warm-up: kernels, allocator, workspaces
        model.encode(model.decode(z0.to(dtype)))
    meter = PeakMemory()
    knobs = dict(cfg["knobs"])
    res = run_method(cfg["method"], model.encode, model.decode, x, z0, dtype, knobs.pop("max_iterations", 0),
                     clamp=(-1.0, 1.0), peak=2.0, **knobs)
    # the floor: the true latent through this dtype's decoder (the 16-bit rounding's cost)
    true_psnr = reconstruction_psnr(model.decode, z0, x, dtype, clamp=(-1.0, 1.0), peak=2.0).mean().item()
    res.update(label=cfg["label"], model=cfg["model"], size=cfg["size"], peak_mem_mb=meter.peak_mb(),
               loaded_mem_mb=meter.base, true_latent_psnr_db=true_psnr)
    json.dump(res, open(out_path, "w"), default=float)


def memory_worker(config_path, out_path):
    """Peak memory at 1024 px of VAE Encode (ComfyUI's own, batching and all) or of one decoder-inversion
    method (a few iterations are enough: every iteration allocates the same), above the level with the
    model loaded and nothing run: what a user's card must hold beyond the weights."""
    torch.set_num_threads(1)
    cfg = json.load(open(config_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = build_vae(cfg["model"])
    model = vae.first_stage_model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    image = torch.nn.functional.interpolate(load_photos(256, 1), size=cfg["size"], mode="bicubic").clamp(0, 1)
    meter, start = PeakMemory(), time.perf_counter()
    with torch.no_grad():
        if cfg["method"] == "vae_encode":
            vae.encode(image.permute(0, 2, 3, 1))
        else:
            from inversion_ops.decoder import METHODS
            x = (image * 2 - 1).to(device)
            METHODS[cfg["method"]](model.encode, model.decode, x, max_iterations=cfg["max_iterations"],
                                   tolerance=0.0, dtype=torch.float32)
    json.dump(dict(model=cfg["model"], size=cfg["size"], label=cfg["method"], peak_mem_mb=meter.peak_mb(),
                   seconds=time.perf_counter() - start), open(out_path, "w"))


def run_worker(cfg, tmp, flag="--worker"):
    cfg_path = os.path.join(tmp, "cfg.json")
    out_path = os.path.join(tmp, "out.json")
    json.dump(cfg, open(cfg_path, "w"))
    proc = subprocess.run([sys.executable, "-m", "bench.decoder", flag, cfg_path, out_path], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['model']} {cfg['label']} failed:\n{proc.stderr[-3000:]}")
    return json.load(open(out_path))


# ---------------------------------------------------------------------------------------------
# Suite


def summarise(rows):
    """Per model: the issue's four numbers (see the module docstring of bench/results notes)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["label"]: r for r in rows if r["model"] == model}
        grad = by["gradient"]
        target = grad["best_trace_nmse_db"]
        t_grad = time_to_reach(grad["trace"], target)
        reach = {m: time_to_reach(by[m]["trace"], target) for m in GRAD_FREE}
        reached = {m: t for m, t in reach.items() if t is not None}
        best_time = min(reached, key=reached.get) if reached else None
        best_nmse = min(GRAD_FREE, key=lambda m: by[m]["nmse_z_db"])
        fastest = best_time or best_nmse
        out[model] = dict(
            gradient_best_nmse_db=target, gradient_seconds_to_best=t_grad,
            grad_free_seconds_to_gradient_best={m: reach[m] for m in GRAD_FREE},
            fastest_grad_free=best_time,
            speedup_vs_gradient=(t_grad / reached[best_time]) if best_time and reached[best_time] > 0 else None,
            memory_ratio_vs_gradient=(by[fastest]["peak_mem_mb"] / grad["peak_mem_mb"]
                                      if grad["peak_mem_mb"] and grad["peak_mem_mb"] > 0 else None),
            memory_ratio_method=fastest,
            best_grad_free_nmse=best_nmse,
            nmse_gain_db_vs_encoder=by["encoder"]["nmse_z_db"] - by[best_nmse]["nmse_z_db"],
            fp16_minus_fp32_db=by["forward_step fp16"]["nmse_z_db"] - by["forward_step"]["nmse_z_db"],
            bf16_minus_fp32_db=by["forward_step bf16"]["nmse_z_db"] - by["forward_step"]["nmse_z_db"],
            # what the misses above cost a user of the 16-bit VAE: the inverted latent through that VAE's own
            # decoder against the true latent through it (positive: the inversion reconstructs better)
            **{f"{p}_psnr_gain_vs_true_latent_db": by[f"forward_step {p}"]["psnr_db"]
               - by[f"forward_step {p}"]["true_latent_psnr_db"] for p in ("fp16", "bf16")},
        )
    return out


MEMORY_SIZE = 1024


def memory_at_1024(tmp_root=None):
    """Peak memory of VAE Encode and of forward_step (3 iterations) on one 1024 px image, trained tiny TAESD."""
    out = {}
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        for method in ("vae_encode", "forward_step"):
            cfg = dict(model="tiny_taesd_trained", size=MEMORY_SIZE, method=method, max_iterations=3)
            out[method] = run_worker(cfg, tmp, flag="--memory-worker")
            print(f"{MEMORY_SIZE} px {method:12s} +{out[method]['peak_mem_mb']:.0f} MiB "
                  f"{out[method]['seconds']:.1f} s", flush=True)
    return dict(size=MEMORY_SIZE, vae_encode_peak_mb=out["vae_encode"]["peak_mem_mb"],
                forward_step_peak_mb=out["forward_step"]["peak_mem_mb"],
                peak_ratio_vs_vae_encode=out["forward_step"]["peak_mem_mb"] / max(out["vae_encode"]["peak_mem_mb"], 1e-9))


def plot(rows, path):
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            t, v = zip(*r["trace"]) if r["trace"] else ((), ())
            style = dict(marker="o", linestyle="none") if r["label"] == "encoder" else dict(marker=".", markersize=3)
            ax.plot(t, v, label=r["label"], **style)
        size = next(r["size"] for r in rows if r["model"] == model)
        ax.set(title=f"{model} ({size} px)", xlabel="seconds (1 CPU thread)", ylabel="NMSE of z (dB)")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


COLUMNS = ["model", "size", "label", "dtype", "nmse_z_db", "psnr_db", "true_latent_psnr_db", "seconds", "iterations",
           "peak_mem_mb"]


def main(quick=False):
    torch.set_num_threads(1)
    s = settings(quick)
    rows, notes_models = [], {}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for model, size in s["models"].items():
            inputs = os.path.join(tmp, f"{model}.pt")
            info = make_inputs(model, size, s["batch"], inputs)
            notes_models[model] = info
            for label, method, dtype, knobs in methods(s["max_iterations"]):
                cfg = dict(model=model, size=size, label=label, method=method, dtype=dtype, knobs=knobs,
                           inputs=inputs)
                r = run_worker(cfg, tmp)
                r["iterations"] = max(r["iterations"])
                r.pop("residuals", None)
                rows.append(r)
                print(f"{model:20s} {label:18s} NMSE {r['nmse_z_db']:7.2f} dB  PSNR {r['psnr_db']:6.2f} dB  "
                      f"{r['seconds']:7.2f} s  it {r['iterations']:3d}  +{r['peak_mem_mb']:.1f} MiB", flush=True)
    memory = memory_at_1024(tmp_root=None)
    summary = summarise(rows)
    summary["memory_1024"] = memory
    summary["peak_ratio_vs_vae_encode_1024"] = memory["peak_ratio_vs_vae_encode"]
    headline = summary["tiny_taesd_trained"]
    summary.update({k: headline[k] for k in ("speedup_vs_gradient", "memory_ratio_vs_gradient",
                                             "nmse_gain_db_vs_encoder", "fp16_minus_fp32_db")})
    summary["headline_model"] = "tiny_taesd_trained"
    notes = (f"CPU, 1 thread per method process, shared 2-core machine (other jobs running: times are "
             f"indicative, ratios more reliable). Images: {s['batch']} held-out photos "
             f"(tests/data/photo_*_256.jpg) resized per model, 8-bit; x = quantise(D(E(photo))). "
             f"tiny_taesd_trained at {s['models']['tiny_taesd_trained']} px; kl_f8_ch32_random = "
             f"ComfyUI AutoencoderKL (KL-f8 layout, ch={KL_WIDTH} instead of SD's 128, RANDOM weights) at "
             f"{s['models']['kl_f8_ch32_random']} px: reduced width and size so the suite fits ~15 min "
             f"on this CPU. Up to {s['max_iterations']} iterations; gradient-free methods stop at residual RMS "
             f"{TOLERANCE:g} (the node's default); the latent is float32 whatever dtype the VAE runs in. "
             f"Memory = peak RSS above the loaded level, per fresh process; memory_1024: one 1024 px image, "
             f"VAE Encode against forward_step, above the level with the model loaded (no warm-up). "
             f"Models: {json.dumps(notes_models)}. Suite wall time {time.time() - start:.0f} s.")
    write_results("decoder", rows, summary, quick, notes)
    plot(rows, result_path("decoder", "png", quick))
    print()
    print(markdown_table(rows, COLUMNS))
    print()
    print(markdown_table([dict(model=m, **{k: v for k, v in d.items() if not isinstance(v, dict)})
                          for m, d in summary.items() if isinstance(d, dict) and "speedup_vs_gradient" in d],
                         ["model", "speedup_vs_gradient", "memory_ratio_vs_gradient", "memory_ratio_method",
                          "nmse_gain_db_vs_encoder", "best_grad_free_nmse", "fp16_minus_fp32_db", "bf16_minus_fp32_db"]))
    return summary


if __name__ == "__main__":   # run_worker's processes (the suite runs from bench/run.py)
    {"--worker": worker, "--memory-worker": memory_worker}[sys.argv[1]](sys.argv[2], sys.argv[3])
