"""`make bench SUITE=edits [QUICK=1]`: text-guided edits on the TRAINED tiny SD3-layout model (models/README.md),
in a real ComfyUI (in-process, CPU, float32), each with and without a mask, side by side:

  methods   rf: RF-Inversion Edit at the pack's defaults (nodes.rf.rf_inversion_edit, cfg 1);
            flowedit: the FlowEdit node's path (nodes.flowedit), over a small grid of n_max x target cfg; its
            defaults are the grid's best (hit rate, then source PSNR) -> docs/results.md#flowedit-defaults;
            exact: Invert Latent (exact, euler, source prompt, cfg 1) then euler regeneration with the target
            prompt from Inverted Noise (the SamplerCustomAdvanced recipe)
  sources   the real emoji images (make dataset) of the source captions, VAE-encoded at 128 px (16x16 latents)
  mask      a centred 96x96 px box (SetLatentNoiseMask's noise_mask, resized by ComfyUI: 12x12 latent cells)
  metrics   the classifier of bench/models.py (trained only on the real images) says whether the edit shows the
            target caption; source PSNR of the decoded edit (whole image, and the pixels outside the mask);
            NMSE of the latent outside the mask against the source latent; the seam: mean pixel gradient on
            the mask's boundary band over the same band of the unmasked edit (1 = no seam beyond what the edit
            itself draws there); model calls (UNet evaluations) per edit
Writes bench/results/edits.json and edits.png (source, then each edit, per caption pair).
"""
import itertools
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import markdown_table, publish
from bench.models import EDIT_PAIRS, GENERATORS, small, train_classifier
from tools.train_models import EVAL_CAPTIONS, load_emoji, psnr

STEPS, BOX = 28, (16, 112)                          # mask box in pixels: rows and columns 16..111
FLOWEDIT_GRID = {"n_max": (16, 22, 28), "target_cfg": (3.5, 5.5, 9.0, 13.5)}
QUICK_FLOWEDIT_GRID = {"n_max": (20,), "target_cfg": (13.5,)}
COLUMNS = ("method", "setting", "masked", "pairs", "target_hit_rate", "target_probability", "source_psnr_db",
           "outside_psnr_db", "outside_nmse_db", "seam_ratio", "model_calls")


def pixel_mask():
    mask = torch.zeros(1, 128, 128)
    mask[:, BOX[0]:BOX[1], BOX[0]:BOX[1]] = 1.0
    return mask


def boundary_band(mask, width=2):
    """Pixels within `width` of the mask's edge, on either side: (1, 1, H, W) bool."""
    m = mask[:, None]
    grown = F.max_pool2d(m, 2 * width + 1, 1, width)
    shrunk = -F.max_pool2d(-m, 2 * width + 1, 1, width)
    return (grown - shrunk) > 0


def gradient(images):
    """Mean absolute horizontal + vertical difference per pixel, (B, 1, H, W)."""
    dx = F.pad((images[..., :, 1:] - images[..., :, :-1]).abs(), (0, 1, 0, 0))
    dy = F.pad((images[..., 1:, :] - images[..., :-1, :]).abs(), (0, 0, 0, 1))
    return (dx + dy).mean(1, keepdim=True)


class Counter:
    """A unet_function_wrapper that counts UNet evaluations (cond and uncond batched count once)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, apply_model, args):
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])


def edit_once(runtime, model, method, setting, conds, latent):
    """One edit through the pack's node paths; returns the edited latent (user space)."""
    rf, fe = runtime.pack_module("nodes.rf"), runtime.pack_module("nodes.flowedit")
    exact, sampling = runtime.pack_module("nodes.exact"), runtime.pack_module("nodes.sampling")
    src, tgt, neg = conds
    if method == "rf":
        d = runtime.pack_module("inversion_ops.rf").EDIT_DEFAULTS
        return rf.rf_inversion_edit(model, src, tgt, None, latent, d["steps"], "simple", 1.0, d["gamma"], d["eta"],
                                    d["start"], d["stop"], 0)[0]["samples"]
    if method == "flowedit":
        ops = runtime.pack_module("inversion_ops.flowedit")
        out = fe.FlowEdit.execute(model, src, tgt, neg, ops.SOURCE_CFG, setting["target_cfg"], latent, STEPS,
                                  "simple", setting["n_max"], ops.N_MIN, ops.N_AVG, 0)
        return out.result[0]["samples"]
    import comfy.samplers
    clean = {"samples": latent["samples"]}
    inverted = exact.InvertLatent.execute(model, src, src, clean, "euler", "simple", STEPS, 1.0, "exact", 50, 1e-4,
                                          1.0).result[0]
    noise = sampling.InvertedNoise(model, inverted["samples"]).generate_noise(latent)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return sampling.run_sampler(model, tgt, tgt, 1.0, latent, comfy.samplers.ksampler("euler"), sigmas,
                                noise=noise)["samples"]


def settings(quick, ops):
    grid = QUICK_FLOWEDIT_GRID if quick else FLOWEDIT_GRID
    points = set(itertools.product(grid["n_max"], grid["target_cfg"])) | {(ops.N_MAX, ops.TARGET_CFG)}
    yield "rf", "defaults", {}
    for n_max, cfg in sorted(points):
        yield "flowedit", f"n_max {n_max}, target cfg {cfg:g}", {"n_max": n_max, "target_cfg": cfg}
    yield "exact", "euler, cfg 1", {}


def run(runtime, nodes, classifier, real128, pairs, quick):
    """Every (method, setting, masked) over the pairs: per-edit records and the decoded edits for the grid."""
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(GENERATORS["flow_trained"])[:3]
    counter = Counter()
    model = model.clone()
    model.set_model_unet_function_wrapper(counter)
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    mask, records, images = pixel_mask(), {}, {}
    band = boundary_band(mask)
    for p, (source, target) in enumerate(pairs):
        image = real128[EVAL_CAPTIONS.index(source)][None]
        latent = {"samples": vae.encode(image.movedim(1, -1))}
        conds = (encode(source), encode(target), encode(""))
        images[(p, "source")] = image
        for (method, label, setting), masked in itertools.product(list(settings(quick, runtime.pack_module("inversion_ops.flowedit"))), (False, True)):
            given = dict(latent, noise_mask=mask) if masked else latent
            counter.calls = 0
            out = edit_once(runtime, model, method, setting, conds, given)
            decoded = vae.decode(out).movedim(-1, 1).float()
            with torch.no_grad():
                prob = torch.softmax(classifier(small(decoded.movedim(1, -1))), 1)[0]
            keep = 1 - F.interpolate(mask[None], size=out.shape[-2:], mode="bilinear")[0, 0]
            outside = (out - latent["samples"]) * keep
            record = dict(hit=float(prob.argmax() == EVAL_CAPTIONS.index(target)),
                          prob=prob[EVAL_CAPTIONS.index(target)].item(), psnr=psnr(decoded, image),
                          outside_psnr=_masked_psnr(decoded, image, mask[0] < 0.5), calls=counter.calls,
                          outside_nmse=_nmse_db(outside, latent["samples"] * keep),
                          band=gradient(decoded)[band].mean().item())
            records.setdefault((method, label, masked), []).append(record)
            images[(p, method, label, masked)] = decoded
        print(f"pair {p + 1}/{len(pairs)} ({source} -> {target}) done", flush=True)
    return records, images


def _masked_psnr(a, b, where):
    mse = (a - b).pow(2).mean(1)[0][where].mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def _nmse_db(error, reference):
    ratio = error.double().pow(2).sum() / reference.double().pow(2).sum().clamp_min(1e-30)
    return 10 * math.log10(max(ratio.item(), 1e-30))


def rows_of(records):
    rows = []
    for (method, label, masked), recs in records.items():
        unmasked = records[(method, label, False)]
        mean = lambda key, rs=recs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        rows.append(dict(method=method, setting=label, masked=masked, pairs=len(recs),
                         target_hit_rate=round(mean("hit"), 3), target_probability=round(mean("prob"), 3),
                         source_psnr_db=round(mean("psnr"), 2), outside_psnr_db=round(mean("outside_psnr"), 2),
                         outside_nmse_db=round(max(r["outside_nmse"] for r in recs), 1) if masked else None,
                         seam_ratio=round(mean("band") / mean("band", unmasked), 3),
                         model_calls=round(mean("calls"), 1)))
    return rows


def summarize(rows, flowedit_defaults):
    def pick(method, masked, setting=None):
        return next(r for r in rows if r["method"] == method and r["masked"] == masked
                    and (setting is None or r["setting"] == setting))

    flow = [r for r in rows if r["method"] == "flowedit" and not r["masked"]]
    best = max(flow, key=lambda r: (r["target_hit_rate"], r["source_psnr_db"]))
    default = pick("flowedit", False, flowedit_defaults)
    masked = [r for r in rows if r["masked"] and (r["method"] != "flowedit" or r["setting"] == flowedit_defaults)]
    rf = pick("rf", False)
    return {"masked_outside_nmse_db": max(r["outside_nmse_db"] for r in masked),
            "masked_target_hit_rate": min(r["target_hit_rate"] for r in masked),
            "masked_seam_ratio_max": max(r["seam_ratio"] for r in masked),
            "flowedit_target_hit_rate": default["target_hit_rate"],
            "flowedit_source_psnr_db": default["source_psnr_db"],
            "flowedit_model_calls": default["model_calls"],
            "flowedit_defaults": flowedit_defaults, "flowedit_grid_best": best["setting"],
            "rf_target_hit_rate": rf["target_hit_rate"], "rf_source_psnr_db": rf["source_psnr_db"],
            "rf_model_calls": rf["model_calls"],
            "exact_target_hit_rate": pick("exact", False)["target_hit_rate"],
            "exact_source_psnr_db": pick("exact", False)["source_psnr_db"]}


def draw_grid(path, images, pairs, columns):
    """Per pair: the source, then each (method, setting, masked) edit; the mask box drawn on masked edits."""
    from PIL import Image, ImageDraw
    tile, head = 96, 30
    canvas = Image.new("RGB", (tile * (1 + len(columns)), head + tile * len(pairs)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["source"] + [f"{m}{' masked' if k else ''}" for m, _, k in columns]):
        draw.text((c * tile + 3, 4), name, fill="black")
    box = [round(v * tile / 128) for v in (BOX[0], BOX[0], BOX[1] - 1, BOX[1] - 1)]
    for p in range(len(pairs)):
        draw.text((3, 16), "red: mask box", fill="red")
        keys = [(p, "source")] + [(p, *col) for col in columns]
        for c, key in enumerate(keys):
            im = F.interpolate(images[key], size=(tile, tile), mode="area")[0]
            cell = Image.fromarray((im.clamp(0, 1).movedim(0, -1) * 255).round().byte().numpy())
            if len(key) == 4 and key[3]:
                ImageDraw.Draw(cell).rectangle(box, outline="red")
            canvas.paste(cell, (c * tile, head + p * tile))
    canvas.save(path)


def main(quick=False):
    from tests.support.comfy_runtime import InProcessComfy
    start = time.time()
    files, captions, pixels = load_emoji()
    real128 = pixels[[captions.index(c) for c in EVAL_CAPTIONS]].float() / 255
    classifier = train_classifier(F.interpolate(real128, size=(64, 64), mode="area"), quick)[0]
    pairs = EDIT_PAIRS[:2] if quick else EDIT_PAIRS
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        with torch.inference_mode():
            records, images = run(runtime, runtime.nodes, classifier, real128, pairs, quick)
        ops = runtime.pack_module("inversion_ops.flowedit")
        defaults = f"n_max {ops.N_MAX}, target cfg {ops.TARGET_CFG:g}"
    rows = rows_of(records)
    summary = summarize(rows, defaults)
    summary["seconds"] = round(time.time() - start, 1)
    columns = [("rf", "defaults", False), ("rf", "defaults", True), ("flowedit", defaults, False),
               ("flowedit", defaults, True), ("exact", "euler, cfg 1", False), ("exact", "euler, cfg 1", True)]
    notes = (f"trained tiny SD3-layout MMDiT (flow, 1.88M params, emoji) + its 16-channel VAE, float32, CPU; 128 px, "
             f"{STEPS} steps 'simple'; {len(pairs)} caption pairs from the real emoji; mask: centred box "
             f"{BOX[0]}..{BOX[1]} px; classifier of bench/models.py")
    publish("edits", rows, summary, quick, notes, lambda path: draw_grid(path, images, pairs, columns), COLUMNS)
    print(markdown_table([dict(key=k, value=v) for k, v in summary.items()], ["key", "value"]))
