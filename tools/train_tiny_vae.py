"""Train a tiny TAESD-layout autoencoder (4 latent channels) on photographs bundled in PyPI packages.

The result loads strictly into ComfyUI's own `comfy.taesd.taesd.TAESD` and, placed in
`models/vae`, is picked up by ComfyUI's VAELoader (comfy.sd.VAE detects `taesd_decoder.1.weight`).
It exists so decoder inversion can be tested and benchmarked on a real nonlinear conv VAE without
downloading weights.

Data (no download: the image files ship inside the wheels):
  scikit-image 0.26.0 (skimage/data/*.png|jpg) and scikit-learn 1.9.1 (sklearn/datasets/images).
  Installed for the training run only, without dependencies, e.g.
      $COMFY_PYTHON -m pip install --no-deps --target /tmp/tinyvae_deps scikit-image==0.26.0 scikit-learn==1.9.1
      PYTHONPATH=/tmp/tinyvae_deps $COMFY_PYTHON tools/train_tiny_vae.py
  The files are only located (importlib find_spec), never imported, so the packages' own
  dependencies are not needed. Train: astronaut, rocket, motorcycle_left/right, hubble_deep_field,
  retina, ihc, flower (sklearn), and grey camera, brick, grass, gravel, moon, coins replicated to
  RGB. Held out: chelsea, coffee, china (sklearn): PSNR on 4 fixed 128 px crops of each, inputs
  quantised to 8 bit.

Initialisation (what made it train quickly on a CPU, see shared notes section A): an exact 8x
average-down encoder and nearest-up decoder through the first 3 of 64 channels, every residual
Block the identity (its last conv zero), so training starts at the 8x box-filter PSNR.
Latent = 2 * mean(pixels in [0,1]) - 1 per channel (3 channels), the 4th starts at 0.

Training: random 64 px crops with horizontal flips, inputs quantised to 8 bit, batch 4, pixel MSE,
Adam lr 3e-4 with a 20-step warm-up and cosine decay over the wall-time budget (the defaults).

Usage: PYTHONPATH=/tmp/tinyvae_deps $COMFY_PYTHON tools/train_tiny_vae.py [--minutes 9] [--out ...]
       PYTHONPATH=/tmp/tinyvae_deps $COMFY_PYTHON tools/train_tiny_vae.py --verify models/tiny_taesd_trained.safetensors
Needs COMFYUI_DIR in the environment (tools/provision.sh sets it).
"""
import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [("skimage", f) for f in ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
                                   "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "brick.png",
                                   "grass.png", "gravel.png", "moon.png", "coins.png")] + [("sklearn", "flower.jpg")]
HELD_OUT = [("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("sklearn", "china.jpg")]
DATA_DIRS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}


def import_comfy_taesd():
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("COMFYUI_DIR is not set: run `eval \"$(bash tools/provision.sh)\"` first")
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    from comfy.taesd.taesd import TAESD
    return TAESD


def load_image(pkg, name, max_side=640):
    spec = importlib.util.find_spec(pkg)
    if spec is None:
        sys.exit(f"{pkg} not found: install it for this run (see the docstring)")
    path = os.path.join(spec.submodule_search_locations[0], *DATA_DIRS[pkg][1:], name)
    im = Image.open(path).convert("RGB")
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def random_crops(images, n, size, g):
    out = []
    for _ in range(n):
        im = images[torch.randint(len(images), (1,), generator=g).item()]
        _, h, w = im.shape
        y = torch.randint(h - size + 1, (1,), generator=g).item()
        x = torch.randint(w - size + 1, (1,), generator=g).item()
        c = im[:, y:y + size, x:x + size]
        if torch.rand(1, generator=g).item() < 0.5:
            c = c.flip(2)
        out.append(c)
    return torch.stack(out)


def held_out_crops(images, size=128):
    """4 fixed crops per image (centre and three corners inset by 16 px), quantised to 8 bit."""
    out = []
    for im in images:
        _, h, w = im.shape
        for y, x in (((h - size) // 2, (w - size) // 2), (16, 16), (16, w - size - 16), (h - size - 16, 16)):
            out.append(im[:, y:y + size, x:x + size])
    return (torch.stack(out) * 255).round() / 255


def init_box_filter(model):
    """Exact 8x average-down / nearest-up through channels 0..2; every Block starts as the identity."""
    enc, dec = model.taesd_encoder, model.taesd_decoder
    eye3 = torch.zeros(64, 3, 3, 3)
    for c in range(3):
        eye3[c, c, 1, 1] = 1
    with torch.no_grad():
        for m in model.modules():             # ComfyUI's ops skip weight init: use PyTorch's default
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(m)
        for m in list(enc.modules()) + list(dec.modules()):
            if m.__class__.__name__ == "Block":
                m.conv[4].weight.zero_()      # last conv of the residual branch
                m.conv[4].bias.zero_()
        enc[0].weight.copy_(eye3); enc[0].bias.zero_()
        for i in (2, 6, 10):                  # stride-2 convs: 2x2 average at taps [1:3, 1:3]
            w = torch.zeros(64, 64, 3, 3)
            for c in range(64):
                w[c, c, 1:3, 1:3] = 0.25
            enc[i].weight.copy_(w)
        w = torch.zeros(4, 64, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = 2.0               # latent = 2 * mean - 1
        enc[14].weight.copy_(w); enc[14].bias.copy_(torch.tensor([-1.0, -1.0, -1.0, 0.0]))
        w = torch.zeros(64, 4, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = 0.5               # back to [0, 1] before the ReLU
        dec[1].weight.copy_(w); dec[1].bias.zero_(); dec[1].bias[:3] = 0.5
        for i in (7, 12, 17):                 # conv after each nearest upsample: identity
            w = torch.zeros(64, 64, 3, 3)
            for c in range(64):
                w[c, c, 1, 1] = 1
            dec[i].weight.copy_(w)
        w = torch.zeros(3, 64, 3, 3)
        for c in range(3):
            w[c, c, 1, 1] = 1
        dec[19].weight.copy_(w); dec[19].bias.zero_()


def roundtrip(model, x01):
    """x in [0, 1] -> latent -> x in [0, 1], through TAESD.encode/decode ([-1, 1] convention)."""
    return (model.decode(model.encode(x01 * 2 - 1)) + 1) / 2


def psnr(a, b):
    mse = (a.clamp(0, 1) - b).flatten(1).pow(2).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


def verify(path):
    """Load the file as ComfyUI's VAELoader would (comfy.sd.VAE) and round-trip the held-out crops."""
    import_comfy_taesd()
    import comfy.sd
    import comfy.utils
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    vae = comfy.sd.VAE(sd=sd)
    held = held_out_crops([load_image(*k) for k in HELD_OUT])
    latent = vae.encode(held.movedim(1, -1))                  # ComfyUI IMAGE is (B, H, W, C) in [0, 1]
    image = vae.decode(latent).movedim(-1, 1).float()
    print(f"comfy.sd.VAE: {type(vae.first_stage_model).__name__}, latent {tuple(latent.shape)}, "
          f"vae_scale {vae.first_stage_model.vae_scale.item()}, vae_shift {vae.first_stage_model.vae_shift.item()}, "
          f"held-out round-trip PSNR {psnr(image, held):.2f} dB")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verify", metavar="PATH", help="only load PATH through comfy.sd.VAE and report its PSNR")
    p.add_argument("--minutes", type=float, default=9.0, help="training wall-time budget")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "models", "tiny_taesd_trained.safetensors"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.verify:
        return verify(a.verify)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)

    TAESD = import_comfy_taesd()
    train = [load_image(*k) for k in TRAIN]
    held = held_out_crops([load_image(*k) for k in HELD_OUT])
    bicubic = F.interpolate(F.interpolate(held, scale_factor=1 / 8, mode="area"), scale_factor=8, mode="bicubic")
    print(f"held-out: {len(held)} crops 128 px; 8x area-down/bicubic-up PSNR {psnr(bicubic, held):.2f} dB", flush=True)

    model = TAESD(latent_channels=4)
    init_box_filter(model)
    model.vae_scale.requires_grad_(False)
    model.vae_shift.requires_grad_(False)
    with torch.no_grad():
        print(f"init PSNR {psnr(roundtrip(model, held), held):.2f} dB", flush=True)

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr)
    budget = a.minutes * 60
    t0, step, last_eval = time.perf_counter(), 0, 0.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            break
        frac = elapsed / budget                           # cosine decay over the time budget
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        x = random_crops(train, a.batch, a.crop, g)
        x = (x * 255).round() / 255
        loss = F.mse_loss(roundtrip(model, x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if elapsed - last_eval > 60:
            last_eval = elapsed
            with torch.no_grad():
                print(f"{elapsed:6.0f}s step {step:5d} train loss {loss.item():.5f} "
                      f"held-out PSNR {psnr(roundtrip(model, held), held):.2f} dB", flush=True)
    wall = time.perf_counter() - t0

    from safetensors.torch import save_file
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    save_file(sd, a.out, metadata={"format": "pt", "note": "tiny TAESD-layout VAE, see models/README.md"})

    check = TAESD(latent_channels=4)
    check.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        fp32 = psnr(roundtrip(model, held), held)
        fp16 = psnr(roundtrip(check, held), held)
    print(f"done: {step} steps in {wall:.0f} s ({a.threads} threads, crop {a.crop}, batch {a.batch}); "
          f"held-out PSNR fp32 {fp32:.2f} dB, saved fp16 weights {fp16:.2f} dB -> {a.out} "
          f"({os.path.getsize(a.out) / 2**20:.2f} MiB)", flush=True)


if __name__ == "__main__":
    main()
