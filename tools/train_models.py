"""Train the tiny models on the captioned emoji set (issue 13), through ComfyUI's own classes, on the CPU.

Stages (each deterministic for a given machine and thread count; seeds fixed, CPU generators):
  vae        TAESD layout, 4 latent channels, 128 px -> 16x16 latents      models/tiny_taesd_trained.safetensors
  vae16      the 16-channel TAESD for the SD3 layout: the 4-channel one with its latent convs widened
             and fine-tuned (only those tensors are stored)                models/tiny_taesd3_trained_delta.safetensors
  embed      caption embeddings through the CLIP-L that the tiny checkpoints carry (cache only)
  eps        SD1.5-layout EPS UNet on the 4-channel latents                models/tiny_sd15_trained_delta.safetensors
  flow       SD3-layout MMDiT (rectified flow) on the 16-channel latents  models/tiny_sd3_trained.safetensors
  flux2      FLUX.2-layout transformer on taef2's packed 128-channel latents of the images at 256 px
             (ComfyUI 0.33 or later, the taef2 weights in ../shared)   models/tiny_flux2_trained.safetensors
The recipe, budgets and loss curves are in models/README.md; `bench/models.py` measures the results.

Usage: $COMFY_PYTHON tools/train_models.py STAGE [--minutes M | --steps N] (after `make dataset`); the defaults
are the recipe that made the committed files (RECIPE).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODELS = os.path.join(REPO, "models")
VAE4 = os.path.join(MODELS, "tiny_taesd_trained.safetensors")
VAE16_DELTA = os.path.join(MODELS, "tiny_taesd3_trained_delta.safetensors")
HELD_OUT_EVERY = 25          # every 25th image (sorted by file name) is held out from VAE training
# The 20 captions that the diffusion models learn and the classifier judges (fixed before training).
EVAL_CAPTIONS = (
    "cat face", "dog face", "tiger face", "rabbit face", "pig face", "frog face", "red apple", "green apple",
    "tangerine", "strawberry", "grapes", "sunflower", "tulip", "snowman", "rocket", "automobile",
    "christmas tree", "jack-o-lantern", "hot beverage", "sun with face")


def emoji_dir():
    from tools.emoji_dataset import cache_dir
    folder = cache_dir() / "images"
    if not (folder / "manifest.json").exists():
        sys.exit(f"{folder} has no emoji set: run `make dataset` first")
    return folder


def load_emoji():
    """(files, captions, uint8 tensor (N, 3, 128, 128)) sorted by file name."""
    from PIL import Image
    folder = emoji_dir()
    captions = json.loads((folder / "captions.json").read_text())
    files = sorted(captions)
    pixels = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in files])
    return files, [captions[f] for f in files], torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def vae_split(n):
    held = [i for i in range(n) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    return [i for i in range(n) if i not in set(held)], held


def import_comfy():
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("COMFYUI_DIR is not set: run `eval \"$(bash tools/provision.sh)\"` first")
    import tests.support  # noqa: F401  (ours first: ComfyUI also has a `tests` package)
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401


def psnr(a, b):
    mse = (a.clamp(0, 1) - b).flatten(1).pow(2).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


def roundtrip(model, x01):
    return (model.decode(model.encode(x01 * 2 - 1)) + 1) / 2


def cosine_lr(opt, base, step, frac, warmup=20):
    for group in opt.param_groups:
        group["lr"] = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train_loop(name, params, loss_fn, minutes, lr, evaluate=None, eval_every=60, steps=None):
    """Adam with warm-up and cosine decay over a wall-time budget, or over `steps` steps when given (then
    the run does not depend on the machine's speed); returns the loss curve."""
    opt = torch.optim.Adam(params, lr=lr)
    budget, t0, step, last, curve = minutes * 60, time.perf_counter(), 0, -1e9, []
    while (step < steps) if steps else ((time.perf_counter() - t0) < budget):
        elapsed = time.perf_counter() - t0
        cosine_lr(opt, lr, step, step / steps if steps else elapsed / budget)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        curve.append([round(elapsed, 1), step, loss.item()])
        if elapsed - last > eval_every:
            last = elapsed
            extra = evaluate() if evaluate else ""
            print(f"[{name}] {elapsed:6.0f}s step {step:5d} loss {loss.item():.5f} {extra}", flush=True)
    return curve, step, time.perf_counter() - t0


def save_curve(name, curve, **info):
    path = os.path.join(MODELS, "curves", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**info, "columns": ["seconds", "step", "loss"], "curve": curve[::max(1, len(curve) // 400)]}, f)


def save_fp16(sd, path, note):
    from safetensors.torch import save_file
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, path,
              metadata={"format": "pt", "note": note})
    print(f"saved {path} ({os.path.getsize(path) / 2**20:.2f} MiB)", flush=True)


# ---------------------------------------------------------------- VAE (4 channels)

def train_autoencoder(name, model, train, held, g, a):
    """Pixel MSE on random crops (one offset per batch) of the uint8 train images; held-out PSNR logged."""
    def batch(step):
        idx = torch.randint(len(train), (a.batch,), generator=g)
        y, x = torch.randint(0, 128 - a.crop + 1, (2,), generator=g).tolist()
        x01 = train[idx, :, y:y + a.crop, x:x + a.crop].float() / 255
        return F.mse_loss(roundtrip(model, x01), x01)

    def evaluate():
        with torch.no_grad():
            return f"held-out PSNR {psnr(roundtrip(model, held), held):.2f} dB"

    print(f"[{name}] init: {evaluate()}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    curve, steps, wall = train_loop(name, params, batch, a.minutes, a.lr, evaluate, steps=a.steps)
    final = evaluate()
    print(f"[{name}] done: {steps} steps in {wall:.0f} s; {final}", flush=True)
    return curve, steps, wall, final



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


def stage_vae(a):
    import comfy.taesd.taesd as taesd
    _, _, pixels = load_emoji()
    train_idx, held_idx = vae_split(len(pixels))
    train = pixels[train_idx]
    held = pixels[held_idx].float() / 255
    g = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    model = taesd.TAESD(latent_channels=4)
    init_box_filter(model)
    model.vae_scale.requires_grad_(False)
    model.vae_shift.requires_grad_(False)

    print(f"[vae] {len(train)} train / {len(held)} held-out images", flush=True)
    curve, steps, wall, final = train_autoencoder("vae", model, train, held, g, a)
    set_latent_stats(model, pixels[train_idx])
    save_fp16(model.state_dict(), VAE4, "tiny TAESD-layout VAE (4 ch) trained on Noto emoji, see models/README.md")
    save_curve("vae", curve, steps=steps, seconds=round(wall), threads=torch.get_num_threads(),
               batch=a.batch, crop=a.crop, lr=a.lr, final=final)


def set_latent_stats(model, pixels_u8, scale_factor=0.18215, shift_factor=0.0):
    """vae_scale / vae_shift so that the diffusion model sees unit-variance latents centred on zero.

    ComfyUI's TAESD returns encoder(x) / vae_scale + vae_shift and the model's latent format then
    applies (latent - shift_factor) * scale_factor (SD1.5: 0.18215, 0; SD3: 1.5305, 0.0609)."""
    with torch.no_grad():
        z = torch.cat([model.taesd_encoder(pixels_u8[i:i + 64].float() / 255)
                       for i in range(0, len(pixels_u8), 64)])
    mean, std = z.mean().item(), z.std().item()
    model.vae_scale.fill_(scale_factor * std)
    model.vae_shift.fill_(shift_factor - mean / model.vae_scale.item())
    print(f"encoder latents: mean {mean:.4f} std {std:.4f} -> vae_scale {model.vae_scale.item():.5f} "
          f"vae_shift {model.vae_shift.item():.4f}", flush=True)


# ---------------------------------------------------------------- VAE (16 channels, for the SD3 layout)

def stage_vae16(a):
    """Widen the 4-channel VAE's latent convs to 16 channels (new channels start silent) and fine-tune
    only the tensors next to the latent; everything else stays the 4-channel VAE's."""
    from safetensors.torch import load_file
    from tests.support.tiny_models import VAE16_TRAINED_KEYS, widen_taesd
    import comfy.taesd.taesd as taesd
    _, _, pixels = load_emoji()
    train_idx, held_idx = vae_split(len(pixels))
    train, held = pixels[train_idx], pixels[held_idx].float() / 255
    g = torch.Generator().manual_seed(a.seed + 16)
    torch.manual_seed(a.seed + 16)
    model = taesd.TAESD(latent_channels=16)
    model.load_state_dict(widen_taesd(load_file(VAE4), 16, g), strict=True)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(k) for k in VAE16_TRAINED_KEYS))

    curve, steps, wall, final = train_autoencoder("vae16", model, train, held, g, a)
    set_latent_stats(model, train, scale_factor=1.5305, shift_factor=0.0609)
    sd = model.state_dict()
    save_fp16({k: v for k, v in sd.items() if any(k.startswith(t) for t in VAE16_TRAINED_KEYS + ("vae_",))},
              VAE16_DELTA, "the 16-channel tiny TAESD's own tensors; the rest is tiny_taesd_trained, see models/README.md")
    save_curve("vae16", curve, steps=steps, seconds=round(wall), threads=torch.get_num_threads(),
               batch=a.batch, crop=a.crop, lr=a.lr, final=final)


# ---------------------------------------------------------------- caption embeddings

def stage_embed(a):
    """Compute and cache the conditioning; store its fingerprint and the text encoder's hash in models/."""
    from tests.support.tiny_models import (CAPTION_EMBEDDINGS, caption_embeddings, clip_l_state_dict,
                                           embedding_fingerprint, state_dict_sha256)
    record = {"clip_l_sha256": state_dict_sha256(clip_l_state_dict()), "captions": ("",) + EVAL_CAPTIONS,
              "fingerprint": {}}
    for layout in ("sd15", "sd3"):
        emb = caption_embeddings(layout, record["captions"])
        record["fingerprint"][layout] = [[round(v, 6) for v in row]
                                         for row in embedding_fingerprint(emb["cond"], emb["pooled"]).tolist()]
        print(f"[embed] {layout}: cond {tuple(emb['cond'].shape)} pooled {tuple(emb['pooled'].shape)}", flush=True)
    with open(CAPTION_EMBEDDINGS, "w") as f:
        json.dump(record, f, indent=1)
    print(f"[embed] CLIP-L sha256 {record['clip_l_sha256'][:16]}... -> {CAPTION_EMBEDDINGS}", flush=True)


# ---------------------------------------------------------------- diffusion models

def training_latents(layout):
    """The eval captions' images in the model's own latent space (ComfyUI VAE encode, then process_in)."""
    import comfy.sd
    from tests.support.tiny_models import trained_vae_state_dict
    files, captions, pixels = load_emoji()
    index = [captions.index(c) for c in EVAL_CAPTIONS]
    if layout == "flux2":
        return taef2_latents(pixels[index])
    vae = comfy.sd.VAE(sd=trained_vae_state_dict(16 if layout == "sd3" else 4))
    with torch.no_grad():
        return vae.encode(pixels[index].float().div(255).movedim(1, -1)).detach()


def taef2_latents(pixels_u8, size=256):
    """The images upscaled to `size` px and encoded by FLUX.2's tiny autoencoder through ComfyUI's VAELoader."""
    import nodes
    from tests.support.real_weights import register_taef2
    vae = nodes.VAELoader().load_vae(register_taef2())[0]
    x = F.interpolate(pixels_u8.float() / 255, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        return vae.encode(x.movedim(1, -1)).detach().float()


def diffusion_batch(latents, cond, pooled, g, batch, drop=0.1):
    """A random batch: caption indices, with 10% of the prompts replaced by the empty one (for cfg)."""
    idx = torch.randint(len(latents), (batch,), generator=g)
    drop_mask = torch.rand(batch, generator=g) < drop
    text = torch.where(drop_mask, torch.zeros_like(idx), idx + 1)     # row 0 is the empty prompt
    return latents[idx], cond[text], pooled[text]


def diffusion_setup(layout, config_cls, unet_config, state_dict, seed, text_layout=None):
    """(generator, ComfyUI BaseModel with `state_dict` loaded, model-space latents, cond, pooled) for a stage:
    the model built through ComfyUI's config as the checkpoints are, the eval captions' latents and prompts."""
    from tests.support.tiny_models import caption_embeddings
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    base.diffusion_model.load_state_dict(state_dict, strict=True)
    latents = base.process_latent_in(training_latents(layout)).detach()
    emb = caption_embeddings(text_layout or layout, ("",) + EVAL_CAPTIONS)
    return g, base, latents, emb["cond"].detach(), emb["pooled"].detach()


def stage_eps(a):
    from tests.support.tiny_models import SD15_UNET_CONFIG, sd15_sparse_forward, trained_sd15_base
    import comfy.supported_models as sm
    g, base, latents, cond, pooled = diffusion_setup("sd15", sm.SD15, SD15_UNET_CONFIG, trained_sd15_base(),
                                                     a.seed + 15)
    unet = base.diffusion_model
    trainable = [n for n, _ in unet.named_parameters() if is_sd15_trained(n)]
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trainable)
    ms = base.model_sampling
    print(f"[eps] {len(latents)} latents {tuple(latents.shape[1:])}, std {latents.std():.3f}; "
          f"{sum(p.numel() for n, p in unet.named_parameters() if n in trainable) / 1e6:.2f} M of "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters trained", flush=True)
    check_sparse_forward(base, unet, latents[:2], cond[1:3])

    def loss_fn(step):
        x0, c, _ = diffusion_batch(latents, cond, pooled, g, a.batch)
        t = torch.randint(0, len(ms.sigmas), (len(x0),), generator=g)
        sigma = ms.sigmas[t].float()
        eps = torch.randn(x0.shape, generator=g)
        x = x0 + sigma[:, None, None, None] * eps
        out = sd15_sparse_forward(unet, ms.calculate_input(sigma, x), ms.timestep(sigma).float(), c)
        return F.mse_loss(out, eps)

    curve, steps, wall = train_loop("eps", [p for p in unet.parameters() if p.requires_grad], loss_fn,
                                    a.minutes, a.lr, steps=a.steps)
    check_sparse_forward(base, unet, latents[:2], cond[1:3])
    from tests.support.tiny_models import SD15_DELTA
    save_fp16({k: v for k, v in unet.state_dict().items() if is_sd15_trained(k)}, SD15_DELTA,
              "SD1.5-layout tiny UNet: the trained tensors; see models/README.md")
    save_curve("eps", curve, steps=steps, seconds=round(wall), threads=torch.get_num_threads(), batch=a.batch, lr=a.lr)


def is_sd15_trained(name):
    from tests.support.tiny_models import SD15_TRAINED_PREFIXES
    return name.startswith(SD15_TRAINED_PREFIXES)


def check_sparse_forward(base, unet, x, context):
    """The training shortcut must equal ComfyUI's full UNet forward (the zeroed branches add exact zeros)."""
    with torch.no_grad():
        t = torch.tensor([500.0, 100.0])
        full = unet(x, t, context=context)
        from tests.support.tiny_models import sd15_sparse_forward
        fast = sd15_sparse_forward(unet, x, t, context)
    err = (full - fast).abs().max().item()
    print(f"[eps] sparse forward vs ComfyUI's forward: max |diff| {err:.2e}", flush=True)
    if err > 1e-4:
        sys.exit("the sparse forward does not match ComfyUI's UNet")


def stage_flow(a):
    import comfy.supported_models as sm
    from tests.support.tiny_models import SD3_MMDIT_CONFIG, SD3_TRAINED, _strip, sd3_mmdit_state_dict
    g, base, latents, cond, pooled = diffusion_setup(
        "sd3", sm.SD3, SD3_MMDIT_CONFIG, _strip(sd3_mmdit_state_dict(), "model.diffusion_model."), a.seed + 3)
    print(f"[flow] {len(latents)} latents {tuple(latents.shape[1:])}, std {latents.std():.3f}; "
          f"{sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6:.2f} M parameters", flush=True)

    def loss_fn(step):
        x0, c, y = diffusion_batch(latents, cond, pooled, g, a.batch)
        return velocity_loss(base, x0, g, context=c, y=y)

    curve, steps, wall = train_loop("flow", list(base.diffusion_model.parameters()), loss_fn, a.minutes, a.lr,
                                    steps=a.steps)
    save_fp16(base.diffusion_model.state_dict(), SD3_TRAINED, "SD3-layout tiny MMDiT (flow); see models/README.md")
    save_curve("flow", curve, steps=steps, seconds=round(wall), threads=torch.get_num_threads(), batch=a.batch, lr=a.lr)


def velocity_loss(base, x0, g, **kwargs):
    """Rectified-flow velocity MSE at logit-normal sigmas (as SD3 and FLUX train), through ComfyUI's
    model_sampling; `kwargs` go to the diffusion model."""
    ms = base.model_sampling
    sigma = torch.sigmoid(torch.randn(len(x0), generator=g))
    eps = torch.randn(x0.shape, generator=g)
    s = sigma[:, None, None, None]
    x = (1 - s) * x0 + s * eps
    v = base.diffusion_model(ms.calculate_input(sigma, x), ms.timestep(sigma), **kwargs)
    return F.mse_loss(v, eps - x0)


def stage_flux2(a):
    """FLUX.2 layout: CLIP-L's 77x768 output padded to 512 tokens by ComfyUI's own Flux2.extra_conds; the
    guidance embedding sees a random guidance per sample (there is no teacher to distill), so any value works."""
    import comfy.model_management
    import comfy.supported_models as sm
    from tests.support.flux2 import flux2_missing_reason
    from tests.support.tiny_models import FLUX2_CONFIG, FLUX2_TRAINED, flux2_state_dict
    if flux2_missing_reason():      # `make models` on ComfyUI 0.3.75 trains the other stages
        print(f"[flux2] skipped: {flux2_missing_reason()}", flush=True)
        return
    start = flux2_state_dict()
    if a.init:                      # continue from a saved file (models/README.md says which runs made it)
        from safetensors.torch import load_file
        start = {k: v.float() for k, v in load_file(a.init).items()}
    g, base, latents, cond, _ = diffusion_setup("flux2", sm.Flux2, FLUX2_CONFIG, start, a.seed + 2 + a.part,
                                                text_layout="sd15")
    cond = base.extra_conds(cross_attn=cond, noise=latents[:1], device="cpu")["c_crossattn"].cond
    net = base.diffusion_model.requires_grad_(True)
    comfy.model_management.in_training = True     # ComfyUI's differentiable RoPE path
    print(f"[flux2] {len(latents)} latents {tuple(latents.shape[1:])}, mean {latents.mean():.3f} std "
          f"{latents.std():.3f}; {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters", flush=True)

    def loss_fn(step):
        x0, c, _ = diffusion_batch(latents, cond, cond[:, :1, :1], g, a.batch)
        guidance = 1 + 5 * torch.rand(len(x0), generator=g)
        # ComfyUI's blocks add in place; saved tensors are copied so that autograd can use them
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
            return velocity_loss(base, x0, g, context=c, guidance=guidance)

    curve, steps, wall = train_loop("flux2", list(net.parameters()), loss_fn, a.minutes, a.lr, steps=a.steps)
    save_fp16(net.state_dict(), FLUX2_TRAINED, "FLUX.2-layout tiny transformer on taef2 latents; see models/README.md")
    save_curve("flux2" if not a.part else f"flux2_part{a.part}", curve, steps=steps, seconds=round(wall),
               threads=torch.get_num_threads(), batch=a.batch, lr=a.lr, init=os.path.basename(a.init or "seeded"))


def stage_plot(a):
    """models/loss_curves.png from models/curves/*.json (a running mean over 50 steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ("vae", "vae16", "eps", "flow", "flux2") if os.path.exists(os.path.join(MODELS, "curves", f"{n}.json"))]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        with open(os.path.join(MODELS, "curves", f"{name}.json")) as f:
            record = json.load(f)
        curve = np.array(record["curve"])
        smooth = np.convolve(curve[:, 2], np.ones(min(50, len(curve))) / min(50, len(curve)), mode="valid")
        ax.plot(curve[:, 1], curve[:, 2], color="0.8", lw=0.5)
        ax.plot(curve[len(curve) - len(smooth):, 1], smooth, color="C0")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {record['steps']} steps, {record['seconds']} s", fontsize=9)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("training loss (MSE)")
    fig.suptitle("tools/train_models.py on the 2-core CPU, float32", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(MODELS, "loss_curves.png"), dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--minutes", type=float, default=None, help="training wall-time budget (default: the recipe's)")
    p.add_argument("--steps", type=int, default=None,
                   help="train this many steps instead (deterministic for a given machine and thread count)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="flux2: start from this safetensors file instead of the seeded model")
    p.add_argument("--part", type=int, default=0, help="flux2: the number of this continuation run (seed and curve)")
    a = p.parse_args()
    for key, value in RECIPE.get(a.stage, {}).items():   # what made the committed files (models/README.md)
        if getattr(a, key) is None:
            setattr(a, key, value)
    torch.set_num_threads(a.threads)
    import_comfy()
    STAGES[a.stage](a)


RECIPE = {"vae": dict(minutes=20, lr=1e-3, batch=16), "vae16": dict(minutes=4, lr=5e-4, batch=16),
          "eps": dict(minutes=25, lr=5e-4, batch=16), "flow": dict(minutes=12, lr=1e-3, batch=32),
          "flux2": dict(minutes=22, lr=2e-3, batch=8)}
STAGES = {"vae": stage_vae, "vae16": stage_vae16, "embed": stage_embed, "eps": stage_eps, "flow": stage_flow,
          "flux2": stage_flux2, "plot": stage_plot}

if __name__ == "__main__":
    main()
