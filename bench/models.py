"""`make bench SUITE=models [QUICK=1]`: how good the trained tiny models are (issue 13), in a real ComfyUI.

  VAE         held-out PSNR at 128 px (the 56 emoji that tools/train_models.py never trains on), 8-bit
              inputs, through comfy.sd.VAE as VAELoader loads it; 4 channels and the 16-channel variant,
              beside the 8x box filter (the VAE's initialisation) as a reference
  classifier  a small CNN trained here only on the 20 real caption images (random affine, blur, colour
              and noise augmentation), never on anything a generator made; its accuracy on fresh
              augmentations and on the VAE's reconstructions of the real images is reported as a ceiling
  generators  the trained SD1.5-layout EPS UNet and SD3-layout MMDiT (flow) from their checkpoints
              (CheckpointLoaderSimple), CLIPTextEncode of each caption, KSampler euler / normal, 20 steps,
              cfg 5, 128x128, VAEDecode; the share of samples the classifier assigns to the prompted caption,
              against chance (1/20). The random-weight tiny checkpoints are run the same way as a baseline.
  RF edit    RF-Inversion Edit (nodes.rf.rf_inversion_edit, what the one-node edit runs) on the trained SD3-layout
              model: caption pairs (cat face -> dog face, ...) from the real source image, 28 steps, over
              gamma x eta x stop x cfg; per setting, faithfulness (PSNR of the edit against the source image)
              and the classifier's verdict for the target caption (hit rate, mean probability), beside a fresh
              target generation. The pack's defaults and the paper's are rows of the grid.
Writes bench/results/models.json, one grid PNG per model (real image, then samples, per caption) and
models_rf_edit.png (faithfulness against target hit rate).
"""
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import markdown_table, pyplot, result_path, save_figure, write_results
from tools.train_models import EVAL_CAPTIONS, load_emoji, psnr, vae_split

SAMPLER, SCHEDULER, STEPS, CFG = "euler", "normal", 20, 5.0
GENERATORS = {"eps_trained": "tiny_sd15_trained.safetensors", "flow_trained": "tiny_sd3_trained.safetensors",
              "eps_random": "tiny_sd15_clip.safetensors", "flow_random": "tiny_sd3_clip.safetensors"}


class Classifier(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        widths = (3, 32, 64, 128)
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(widths[-1], classes)

    def forward(self, x):                         # x: (B, 3, 64, 64) in [0, 1]
        return self.head(self.features(x * 2 - 1).mean((2, 3)))


def augment(x, g):
    """Random affine (white fill), blur, brightness / contrast and noise, on (B, 3, 64, 64) in [0, 1]."""
    b = len(x)
    angle = (torch.rand(b, generator=g) - 0.5) * 0.35
    scale = 0.8 + 0.4 * torch.rand(b, generator=g)
    shift = (torch.rand(b, 2, generator=g) - 0.5) * 0.25
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = 1 + F.grid_sample(x - 1, grid, align_corners=False)          # outside the image: white
    sigma = 1.5 * torch.rand(b, generator=g)
    radius = torch.arange(-3, 4).float()
    kernel = torch.exp(-radius[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)                    # (B, 7) separable Gaussian
    x = torch.stack([F.conv2d(F.conv2d(F.pad(xi[:, None], (3, 3, 3, 3), mode="replicate"), k.view(1, 1, 1, 7)),
                              k.view(1, 1, 7, 1))[:, 0] for xi, k in zip(x, kernel)])
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)
    brightness = 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    x = (x - mean) * contrast + mean + brightness
    return (x + 0.04 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_classifier(real, quick, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Classifier(len(real))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = 150 if quick else 600
    labels = torch.arange(len(real))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        idx = labels[torch.randint(len(real), (64,), generator=g)]
        loss = F.cross_entropy(net(augment(real[idx], g)), idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        idx = labels.repeat(10)
        fresh = (net(augment(real[idx], torch.Generator().manual_seed(seed + 1))).argmax(1) == idx).float().mean()
    return net, fresh.item(), loss.item()


def small(images):
    """ComfyUI IMAGE (B, H, W, 3) -> (B, 3, 64, 64)."""
    return F.interpolate(images.movedim(-1, 1).float(), size=(64, 64), mode="area")


def save_grid(path, captions, real, samples, title):
    """One row per caption: the real image, then the samples (64 px tiles), with the caption written."""
    from PIL import Image, ImageDraw
    tile, label = 64, 120
    rows, cols = len(captions), 1 + samples.shape[1]
    canvas = Image.new("RGB", (label + cols * tile, 16 + rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black")
    for r, caption in enumerate(captions):
        draw.text((4, 16 + r * tile + tile // 2 - 6), caption, fill="black")
        tiles = F.interpolate(torch.cat([real[r:r + 1], samples[r]]).float(), size=(tile, tile), mode="area")
        for c, im in enumerate(tiles):
            array = (im.clamp(0, 1).movedim(0, -1) * 255).round().byte().numpy()
            canvas.paste(Image.fromarray(array), (label + c * tile, 16 + r * tile))
    canvas.save(path)


EDIT_PAIRS = (("cat face", "dog face"), ("red apple", "green apple"), ("tiger face", "rabbit face"),
              ("sunflower", "tulip"))
EDIT_GRID = {"gamma": (0.3, 0.5), "eta": (0.6, 0.9, 1.0), "stop": (0.25, 0.5, 0.75), "cfg": (1.0, 3.0)}
QUICK_EDIT_GRID = {"gamma": (0.3, 0.5), "eta": (0.9, 1.0), "stop": (0.25, 0.75), "cfg": (1.0,)}


def rf_edit_rows(runtime, nodes, classifier, real128, quick):
    """The edit sweep; returns (rows, summary)."""
    import itertools
    rf_nodes, rf_ops = runtime.pack_module("nodes.rf"), runtime.pack_module("inversion_ops.rf")
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(GENERATORS["flow_trained"])[:3]
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]
    negative = encode("")
    grid = QUICK_EDIT_GRID if quick else EDIT_GRID
    pairs = EDIT_PAIRS[:2] if quick else EDIT_PAIRS
    steps = rf_ops.EDIT_DEFAULTS["steps"]
    per_setting = {}
    fresh_psnr, fresh_hits = [], []
    for source, target in pairs:
        src_index, tgt_index = EVAL_CAPTIONS.index(source), EVAL_CAPTIONS.index(target)
        image = real128[src_index:src_index + 1]
        latent = {"samples": vae.encode(image.movedim(1, -1))}
        src_cond, tgt_cond = encode(source), encode(target)
        fresh = nodes.common_ksampler(model, 7, steps, 3.0, "euler", "simple", tgt_cond, negative,
                                      {"samples": torch.zeros_like(latent["samples"])})[0]
        fresh_image = vae.decode(fresh["samples"]).movedim(-1, 1).float()
        fresh_psnr.append(psnr(fresh_image, image))
        with torch.no_grad():
            fresh_hits.append(float(classifier(small(fresh_image.movedim(1, -1))).argmax(1).item() == tgt_index))
        for gamma, eta, stop, cfg in itertools.product(grid["gamma"], grid["eta"], grid["stop"], grid["cfg"]):
            out = rf_nodes.rf_inversion_edit(model, src_cond, tgt_cond, negative, latent, steps, "simple", cfg,
                                             gamma, eta, 0.0, stop, 0)[0]
            edited = vae.decode(out["samples"]).movedim(-1, 1).float()
            with torch.no_grad():
                prob = torch.softmax(classifier(small(edited.movedim(1, -1))), 1)[0]
            record = per_setting.setdefault((gamma, eta, stop, cfg), {"psnr": [], "hit": [], "prob": []})
            record["psnr"].append(psnr(edited, image))
            record["hit"].append(float(prob.argmax().item() == tgt_index))
            record["prob"].append(prob[tgt_index].item())
    rows = []
    for (gamma, eta, stop, cfg), r in per_setting.items():
        rows.append(dict(part="rf_edit", gamma=gamma, eta=eta, stop=stop, cfg=cfg, pairs=len(r["hit"]),
                         source_psnr_db=round(sum(r["psnr"]) / len(r["psnr"]), 2),
                         target_hit_rate=round(sum(r["hit"]) / len(r["hit"]), 3),
                         target_probability=round(sum(r["prob"]) / len(r["prob"]), 3)))
    best = max(rows, key=lambda r: (r["target_hit_rate"], r["target_probability"], r["source_psnr_db"]))
    d = rf_ops.EDIT_DEFAULTS

    def at(gamma, eta, stop, cfg=1.0):
        return next((r for r in rows if (r["gamma"], r["eta"], r["stop"], r["cfg"]) == (gamma, eta, stop, cfg)), None)

    summary = {"rf_edit_best": {k: best[k] for k in ("gamma", "eta", "stop", "cfg", "source_psnr_db",
                                                      "target_hit_rate", "target_probability")},
               "rf_edit_pack_defaults": at(d["gamma"], d["eta"], d["stop"]),
               "rf_edit_paper_defaults": at(rf_ops.GAMMA, rf_ops.ETA, rf_ops.STOP),
               "rf_edit_fresh_target_generation": {"source_psnr_db": round(sum(fresh_psnr) / len(fresh_psnr), 2),
                                                   "target_hit_rate": sum(fresh_hits) / len(fresh_hits)}}
    plot_rf_edit(rows, summary, quick)
    return rows, summary


def plot_rf_edit(rows, summary, quick):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for cfg, marker in ((1.0, "o"), (3.0, "s")):
        sel = [r for r in rows if r["cfg"] == cfg]
        if sel:
            ax.scatter([r["source_psnr_db"] for r in sel], [r["target_probability"] for r in sel],
                       c=[r["stop"] for r in sel], cmap="viridis", marker=marker, label=f"cfg {cfg:g}", vmin=0, vmax=1)
    for key, label in (("rf_edit_pack_defaults", "pack defaults"), ("rf_edit_paper_defaults", "paper defaults")):
        r = summary.get(key)
        if r:
            ax.annotate(label, (r["source_psnr_db"], r["target_probability"]), fontsize=8)
    ax.set_xlabel("faithfulness: PSNR of the edit vs the source image (dB)")
    ax.set_ylabel("classifier probability of the target caption")
    ax.set_title("RF-Inversion Edit on the trained tiny SD3-layout model (colour: stop)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, result_path("models_rf_edit", "png", quick), dpi=90)


def generate_all(nodes, classifier, real128, per_caption, rows, summary, quick):
    """Each generator: 20 captions x per_caption samples, classified; rows and summary filled in."""
    for name, ckpt in GENERATORS.items():
        start = time.time()
        n = per_caption if "trained" in name else max(2, per_caption // 2)   # the random baselines: fewer
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[:3]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        samples = []
        for i, caption in enumerate(EVAL_CAPTIONS):
            positive = nodes.CLIPTextEncode().encode(clip, caption)[0]
            latent = nodes.EmptyLatentImage().generate(128, 128, n)[0] if "eps" in name else \
                {"samples": torch.zeros(n, 16, 16, 16)}
            out = nodes.common_ksampler(model, 1000 + i, STEPS, CFG, SAMPLER, SCHEDULER, positive, negative,
                                        latent)[0]
            samples.append(vae.decode(out["samples"]).movedim(-1, 1).float())
        samples = torch.stack(samples)                          # (20, n, 3, 128, 128)
        with torch.no_grad():
            predicted = classifier(F.interpolate(samples.flatten(0, 1), size=(64, 64), mode="area")).argmax(1)
        hits = (predicted.view(20, n) == torch.arange(20)[:, None]).float()
        accuracy = hits.mean().item()
        for caption, h in zip(EVAL_CAPTIONS, hits):
            rows.append(dict(part="generation", model=name, caption=caption, samples=n,
                             accuracy=round(h.mean().item(), 3)))
        summary[f"{name}_class_accuracy"] = round(accuracy, 3)
        seconds = time.time() - start
        summary[f"{name}_seconds"] = round(seconds, 1)
        print(f"{name}: class accuracy {accuracy:.3f} over {hits.numel()} samples ({seconds:.0f} s)", flush=True)
        save_grid(result_path(f"models_{name}", "png", quick), EVAL_CAPTIONS, real128,
                  samples[:, :4], f"{ckpt}: {SAMPLER} {STEPS} steps cfg {CFG:g}, 128 px, seeds 1000+row")


def main(quick):
    from tests.support.comfy_runtime import InProcessComfy
    torch.set_num_threads(2)
    files, captions, pixels = load_emoji()
    _, held_idx = vae_split(len(pixels))
    real128 = pixels[[captions.index(c) for c in EVAL_CAPTIONS]].float() / 255
    real = F.interpolate(real128, size=(64, 64), mode="area")
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        nodes = runtime.nodes
        import comfy.sd
        import comfy.utils
        from tests.support.tiny_models import trained_vae_state_dict

        # VAE held-out PSNR, beside the box filter it started from
        held = pixels[held_idx].float() / 255
        box = F.interpolate(F.avg_pool2d(held, 8), scale_factor=8, mode="nearest")
        summary["box_filter_psnr_db"] = round(psnr(box, held), 2)
        vaes = {}
        for channels, key in ((4, "vae_psnr_db"), (16, "vae16_psnr_db")):
            vae = comfy.sd.VAE(sd=trained_vae_state_dict(channels))
            recon = vae.decode(vae.encode(held.movedim(1, -1))).movedim(-1, 1).float()
            summary[key] = round(psnr(recon, held), 2)
            vaes[channels] = vae
        print(f"VAE held-out PSNR: 4 ch {summary['vae_psnr_db']} dB, 16 ch {summary['vae16_psnr_db']} dB, "
              f"box filter {summary['box_filter_psnr_db']} dB", flush=True)

        start = time.time()
        classifier, fresh, last_loss = train_classifier(real, quick)
        with torch.no_grad():
            ceiling = {ch: (classifier(small(v.decode(v.encode(real128.movedim(1, -1))))).argmax(1)
                            == torch.arange(20)).float().mean().item() for ch, v in vaes.items()}
        summary.update(classifier_fresh_augment_accuracy=round(fresh, 3),
                       classifier_vae4_reconstruction_accuracy=round(ceiling[4], 3),
                       classifier_vae16_reconstruction_accuracy=round(ceiling[16], 3),
                       chance_accuracy=round(1 / len(EVAL_CAPTIONS), 3))
        print(f"classifier ({time.time() - start:.0f} s, last loss {last_loss:.3f}): fresh augmentations "
              f"{fresh:.3f}, VAE reconstructions {ceiling}", flush=True)

        per_caption = 2 if quick else 10
        with torch.inference_mode():   # as ComfyUI's executor runs nodes
            generate_all(nodes, classifier, real128, per_caption, rows, summary, quick)
        with torch.inference_mode():
            edit_rows, edit_summary = rf_edit_rows(runtime, nodes, classifier, real128, quick)
        rows += edit_rows
        summary.update(edit_summary)
        print(markdown_table(edit_rows, ["gamma", "eta", "stop", "cfg", "source_psnr_db", "target_hit_rate",
                                         "target_probability"]), flush=True)
    summary["eps_class_accuracy"] = summary["eps_trained_class_accuracy"]
    summary["flow_class_accuracy"] = summary["flow_trained_class_accuracy"]
    notes = (f"CPU float32; the trained tiny models (models/README.md) against the random-weight tiny checkpoints; "
             f"{SAMPLER}/{SCHEDULER} {STEPS} steps cfg {CFG:g} at 128x128; {per_caption} samples per caption for "
             f"the trained models, {max(2, per_caption // 2)} for the random ones")
    print(markdown_table([dict(key=k, value=v) for k, v in summary.items()], ["key", "value"]))
    return write_results("models", rows, summary, quick, notes)
