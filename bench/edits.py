"""`make bench SUITE=edits [QUICK=1]`: text-guided edits on the TRAINED tiny SD3-layout model (models/README.md),
in a real ComfyUI (in-process, CPU, float32), each without a mask, with a hard mask and with a soft mask:

  methods   rf: RF-Inversion Edit at the pack's defaults (nodes.rf.rf_inversion_edit, cfg 1);
            flowedit: the FlowEdit node's path (nodes.flowedit), unmasked over a grid of n_max x target cfg x
            source cfg (n_min 0, n_avg 1) plus n_min and n_avg variants at the defaults and the paper's SD3
            setting; the defaults are the grid's best (hit rate, then source PSNR) ->
            docs/results.md#flowedit-defaults; masked at the defaults only;
            exact: Invert Latent (exact, euler, source prompt, cfg 1) then euler regeneration with the target
            prompt from Inverted Noise (the SamplerCustomAdvanced recipe)
  sources   the real emoji images (make dataset) of the source captions, VAE-encoded at 128 px (16x16 latents);
            the caption pairs of bench/models.py and each one reversed
  masks     box: a centred 96x96 px box (SetLatentNoiseMask's noise_mask, resized by ComfyUI: 12x12 latent
            cells); soft: the same box feathered inward over 8 or 16 px (1 inside, a linear ramp to 0 at the box's
            edge, 0 outside), run the ComfyUI way: RF and exact on a model patched by Differential Diffusion,
            FlowEdit grading its steps by the mask itself
  metrics   the classifier of bench/models.py (trained only on the real images) says whether the edit shows the
            target caption; source PSNR of the decoded edit (whole image, and the pixels outside the mask);
            NMSE of the latent where the mask is 0 against the source latent; the seam: mean pixel gradient on
            the mask's transition zone (2 px either side of the box's edge, and the soft mask's ramp) over the
            same zone of the unmasked edit (1 = no seam beyond what the edit itself draws there); model calls
            (UNet evaluations) per edit; each row names the pairs whose target it missed
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

STEPS, BOX = 28, (16, 112)                          # box rows and columns 16..111 px
PAIRS = EDIT_PAIRS + tuple((target, source) for source, target in EDIT_PAIRS)
FLOWEDIT_GRID = {"n_max": (4, 6, 8, 12), "target_cfg": (1.5, 2.5, 3.5), "source_cfg": (1.5, 3.5)}
QUICK_FLOWEDIT_GRID = {"n_max": (6,), "target_cfg": (1.5,), "source_cfg": (1.5,)}
PAPER_SD3 = {"n_max": 19, "n_min": 0, "n_avg": 1, "source_cfg": 3.5, "target_cfg": 13.5}  # 33 of 50 steps -> of 28
MASKS = {"none": None, "box": 0, "soft 8 px": 8, "soft 16 px": 16}   # name: the inward ramp in px
SOFT = "soft 8 px"                                  # the soft mask of the summary: one latent cell of ramp
COLUMNS = ("method", "setting", "mask", "pairs", "target_hit_rate", "target_probability", "source_psnr_db",
           "outside_psnr_db", "outside_nmse_db", "seam_ratio", "model_calls")


def pixel_mask(feather=0):
    """The box as a (1, 128, 128) MASK; feather > 0: 1 deep inside, a linear ramp over `feather` px to 0 at its edge."""
    mask = torch.zeros(1, 128, 128)
    mask[:, BOX[0]:BOX[1], BOX[0]:BOX[1]] = 1.0
    if not feather:
        return mask
    rows = torch.arange(128, dtype=torch.float32)
    depth = torch.minimum(rows - BOX[0] + 1, BOX[1] - rows).clamp(0, feather) / feather   # 1/feather at the edge
    return torch.minimum(depth[:, None], depth[None, :])[None]


def transition_zone(mask, width=2):
    """Where the mask changes: pixels within `width` of its 0/nonzero edge, and any fractional value."""
    return boundary_band((mask > 0).float(), width) | ((mask > 0) & (mask < 1))[:, None]


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
        out = fe.FlowEdit.execute(model, src, tgt, neg, setting["source_cfg"], setting["target_cfg"], latent, STEPS,
                                  "simple", setting["n_max"], setting["n_min"], setting["n_avg"], 0)
        return out.result[0]["samples"]
    import comfy.samplers
    clean = {"samples": latent["samples"]}
    inverted = exact.InvertLatent.execute(model, src, src, clean, "euler", "simple", STEPS, 1.0, "exact", 50, 1e-4,
                                          1.0).result[0]
    noise = sampling.InvertedNoise(model, inverted["samples"]).generate_noise(latent)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return sampling.run_sampler(model, tgt, tgt, 1.0, latent, comfy.samplers.ksampler("euler"), sigmas,
                                noise=noise)["samples"]


def flowedit_label(setting):
    return ("n_max {n_max}, n_min {n_min}, n_avg {n_avg}, cfg {source_cfg:g}/{target_cfg:g}").format(**setting)


def flowedit_defaults(ops):
    return dict(n_max=ops.N_MAX, n_min=ops.N_MIN, n_avg=ops.N_AVG, source_cfg=ops.SOURCE_CFG,
                target_cfg=ops.TARGET_CFG)


def settings(quick, ops):
    """(method, label, setting, masks): the grid unmasked, every method's defaults with each mask."""
    grid, defaults = QUICK_FLOWEDIT_GRID if quick else FLOWEDIT_GRID, flowedit_defaults(ops)
    points = [dict(defaults, n_max=n, target_cfg=t, source_cfg=c, n_min=0, n_avg=1)
              for n, t, c in itertools.product(grid["n_max"], grid["target_cfg"], grid["source_cfg"])]
    if not quick:
        points += [dict(defaults, n_min=2), dict(defaults, n_avg=2), PAPER_SD3]
    yield "rf", "defaults", {}, MASKS
    yield "flowedit", flowedit_label(defaults), defaults, MASKS
    seen = {flowedit_label(defaults)}
    for point in points:
        if flowedit_label(point) not in seen:
            seen.add(flowedit_label(point))
            yield "flowedit", flowedit_label(point), point, ("none",)
    yield "exact", "euler, cfg 1", {}, MASKS


def run(runtime, nodes, classifier, real128, pairs, quick):
    """Every (method, setting, mask) over the pairs: per-edit records and the decoded edits for the grid."""
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(GENERATORS["flow_trained"])[:3]
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    counter = Counter()
    graded = DifferentialDiffusion.execute(model).result[0]     # how KSampler paths read a soft mask
    model = model.clone()
    for patched in (model, graded):     # after cloning: a clone deep-copies model_options, the counter too
        patched.set_model_unet_function_wrapper(counter)
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    masks = {name: None if feather is None else pixel_mask(feather) for name, feather in MASKS.items()}
    zones = {name: transition_zone(m if m is not None else masks["box"]) for name, m in masks.items()}
    records, images = {}, {}
    plan = list(settings(quick, runtime.pack_module("inversion_ops.flowedit")))
    for p, (source, target) in enumerate(pairs):
        image = real128[EVAL_CAPTIONS.index(source)][None]
        latent = {"samples": vae.encode(image.movedim(1, -1))}
        conds = (encode(source), encode(target), encode(""))
        images[(p, "source")] = image
        for (method, label, setting, mask_names) in plan:
            for name in mask_names:
                mask = masks[name]
                counter.calls = 0
                out = edit_once(runtime, graded if MASKS[name] else model, method, setting, conds,
                                latent if mask is None else dict(latent, noise_mask=mask))
                decoded = vae.decode(out).movedim(-1, 1).float()
                record = judge(classifier, decoded, image, target, mask, out, latent["samples"], counter.calls)
                record["pair"] = f"{source} -> {target}"
                record["zones"] = {zone: gradient(decoded)[where].mean().item() for zone, where in zones.items()}
                records.setdefault((method, label, name), []).append(record)
                images[(p, method, label, name)] = decoded
        print(f"pair {p + 1}/{len(pairs)} ({source} -> {target}) done", flush=True)
    return records, images


def judge(classifier, decoded, image, target, mask, out, source, calls):
    """One edit's record: target hit and probability, PSNRs, NMSE where the mask is 0, model calls."""
    with torch.no_grad():
        prob = torch.softmax(classifier(small(decoded.movedim(1, -1))), 1)[0]
    wanted = EVAL_CAPTIONS.index(target)
    record = dict(hit=float(prob.argmax() == wanted), prob=prob[wanted].item(),
                  psnr=psnr(decoded, image), calls=calls, outside_psnr=None, outside_nmse=None)
    if mask is not None:
        keep = (F.interpolate(mask[None], size=out.shape[-2:], mode="bilinear")[0, 0] == 0).to(out)
        record["outside_psnr"] = _masked_psnr(decoded, image, mask[0] == 0)
        record["outside_nmse"] = _nmse_db((out - source) * keep, source * keep)
    return record


def _masked_psnr(a, b, where):
    mse = (a - b).pow(2).mean(1)[0][where].mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def _nmse_db(error, reference):
    ratio = error.double().pow(2).sum() / reference.double().pow(2).sum().clamp_min(1e-30)
    return 10 * math.log10(max(ratio.item(), 1e-30))


def rows_of(records):
    rows = []
    for (method, label, mask), recs in records.items():
        plain = records[(method, label, "none")]
        mean = lambda key, rs=recs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        zone = lambda rs: sum(r["zones"][mask] for r in rs) / len(rs)  # noqa: E731
        rows.append(dict(method=method, setting=label, mask=mask, pairs=len(recs),
                         target_hit_rate=round(mean("hit"), 3), target_probability=round(mean("prob"), 3),
                         source_psnr_db=round(mean("psnr"), 2),
                         outside_psnr_db=None if mask == "none" else round(mean("outside_psnr"), 2),
                         outside_nmse_db=None if mask == "none" else round(max(r["outside_nmse"] for r in recs), 1),
                         seam_ratio=None if mask == "none" else round(zone(recs) / zone(plain), 3),
                         model_calls=round(mean("calls"), 1),
                         missed=[r["pair"] for r in recs if not r["hit"]]))
    return rows


def summarize(rows, flowedit_defaults):
    def pick(method, mask, setting=None):
        return next(r for r in rows if r["method"] == method and r["mask"] == mask
                    and (setting is None or r["setting"] == setting))

    flow = [r for r in rows if r["method"] == "flowedit" and r["mask"] == "none"]
    best = max(flow, key=lambda r: (r["target_hit_rate"], r["source_psnr_db"]))
    default = pick("flowedit", "none", flowedit_defaults)
    box = [r for r in rows if r["mask"] == "box"]
    soft = [r for r in rows if r["mask"] == SOFT]
    rf = pick("rf", "none")
    return {"masked_outside_nmse_db": max(r["outside_nmse_db"] for r in rows if r["mask"] != "none"),
            "masked_target_hit_rate": min(r["target_hit_rate"] for r in box),
            "masked_seam_ratio_max": max(r["seam_ratio"] for r in box),
            "soft_mask_target_hit_rate": min(r["target_hit_rate"] for r in soft),
            "soft_mask_seam_ratio_max": max(r["seam_ratio"] for r in soft),
            "pairs": default["pairs"],
            "flowedit_target_hit_rate": default["target_hit_rate"],
            "flowedit_source_psnr_db": default["source_psnr_db"],
            "flowedit_model_calls": default["model_calls"],
            "flowedit_defaults": flowedit_defaults, "flowedit_grid_best": best["setting"],
            "flowedit_paper_sd3_target_hit_rate": next((r["target_hit_rate"] for r in flow
                                                        if r["setting"] == flowedit_label(PAPER_SD3)), None),
            "rf_target_hit_rate": rf["target_hit_rate"], "rf_source_psnr_db": rf["source_psnr_db"],
            "rf_model_calls": rf["model_calls"],
            "exact_target_hit_rate": pick("exact", "none")["target_hit_rate"],
            "exact_source_psnr_db": pick("exact", "none")["source_psnr_db"]}


def draw_grid(path, images, pairs, columns):
    """Per pair: the source, then each (method, setting, mask) edit; the box drawn on masked edits (dashed for
    the soft mask, whose ramp runs inside it)."""
    from PIL import Image, ImageDraw
    tile, head = 96, 30
    canvas = Image.new("RGB", (tile * (1 + len(columns)), head + tile * len(pairs)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["source"] + [f"{m}{'' if k == 'none' else ' ' + k}" for m, _, k in columns]):
        draw.text((c * tile + 3, 4), name, fill="black")
    draw.text((3, 16), "red: mask box", fill="red")
    lo, hi = round(BOX[0] * tile / 128), round((BOX[1] - 1) * tile / 128)
    for p in range(len(pairs)):
        keys = [(p, "source")] + [(p, *col) for col in columns]
        for c, key in enumerate(keys):
            im = F.interpolate(images[key], size=(tile, tile), mode="area")[0]
            cell = Image.fromarray((im.clamp(0, 1).movedim(0, -1) * 255).round().byte().numpy())
            if len(key) == 4 and key[3] != "none":
                pen = ImageDraw.Draw(cell)
                for t in range(lo, hi, 4 if MASKS[key[3]] else 1):
                    for point in ((t, lo), (t, hi), (lo, t), (hi, t)):
                        pen.point(point, fill="red")
            canvas.paste(cell, (c * tile, head + p * tile))
    canvas.save(path)


def main(quick=False):
    from tests.support.comfy_runtime import InProcessComfy
    start = time.time()
    files, captions, pixels = load_emoji()
    real128 = pixels[[captions.index(c) for c in EVAL_CAPTIONS]].float() / 255
    classifier = train_classifier(F.interpolate(real128, size=(64, 64), mode="area"), quick)[0]
    pairs = PAIRS[:2] if quick else PAIRS
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        with torch.inference_mode():
            records, images = run(runtime, runtime.nodes, classifier, real128, pairs, quick)
        defaults = flowedit_label(flowedit_defaults(runtime.pack_module("inversion_ops.flowedit")))
    rows = rows_of(records)
    summary = summarize(rows, defaults)
    summary["seconds"] = round(time.time() - start, 1)
    columns = [(method, label, mask) for method, label in (("rf", "defaults"), ("flowedit", defaults),
                                                           ("exact", "euler, cfg 1")) for mask in MASKS]
    notes = (f"trained tiny SD3-layout MMDiT (flow, 1.88M params, emoji) + its 16-channel VAE, float32, CPU; 128 px, "
             f"{STEPS} steps 'simple'; {len(pairs)} caption pairs from the real emoji (bench/models.py's and each "
             f"reversed); masks: centred box {BOX[0]}..{BOX[1]} px, hard and feathered inward over 8 and 16 px "
             f"(soft; RF and exact then run on ComfyUI's Differential Diffusion); classifier of bench/models.py")
    publish("edits", rows, summary, quick, notes, lambda path: draw_grid(path, images, pairs, columns), COLUMNS)
    print(markdown_table([dict(key=k, value=v) for k, v in summary.items()], ["key", "value"]))
