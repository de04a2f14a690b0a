"""The measured figures of docs/results.md and README.md, kept equal to bench/results/*.json.

Two mechanisms, both checked by tests/test_docs.py:
- Generated tables sit between `<!-- begin generated: NAME -->` and `<!-- end generated: NAME -->`;
  `python tools/results_doc.py` rewrites them from the json files (GENERATORS below).
- A figure in prose carries its source right after it: `-76.0 dB<!-- exact.json:summary.exact_noise_nmse_db -->`
  (a path of keys into bench/results/<file>; a key may contain dots; `*100` after the path scales a fraction
  to the percent shown). The shown value must equal the json value rounded to the decimals shown.

`python tools/results_doc.py --check` rewrites nothing and exits 1 listing every drift.
"""
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
MINUS = "\u2212"

BLOCK = re.compile(r"(<!-- begin generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                   re.S)
FIGURE = re.compile(r"(?P<value>[" + MINUS + r"+-]?\d[\d,]*(?:\.\d+)?)[^\d<]{0,6}"
                    r"<!-- (?P<file>[\w.]+\.json):(?P<path>.+?)(?P<scale>\*100)? -->")


def load(name):
    return json.loads((RESULTS / name).read_text())


def signed(value, decimals=1):
    """A number as the docs print it: a real minus sign, fixed decimals."""
    text = f"{value:+.{decimals}f}" if value > 0 else f"{value:.{decimals}f}"
    return text.replace("-", MINUS)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# How the pack inverts each sampler (the registry, nodes/inverses.py).
BACKWARD_EULER = ("euler", "heun", "dpm_2")
SAMPLER_ORDER = ("euler", "heun", "dpm_2", "heunpp2", "lms", "dpmpp_2m", "deis", "ipndm", "ipndm_v", "uni_pc",
                 "uni_pc_bh2", "res_multistep", "gradient_estimation", "euler_cfg_pp", "dpmpp_2m_cfg_pp",
                 "res_multistep_cfg_pp", "gradient_estimation_cfg_pp")


def how_inverted(sampler):
    if sampler in BACKWARD_EULER:
        return "backward Euler" + (" (also `ddim`)" if sampler == "euler" else ", its own step")
    return "shooting, CFG++ run first" if sampler.endswith("_cfg_pp") else "shooting"


def sampler_table(steps=20):
    """Per sampler at `steps`: the pack's inverter over cfg 1-9 on the analytic EPS and flow mixtures."""
    rows = load("exact_samplers.json")["rows"]
    out = []
    for sampler in SAMPLER_ORDER:
        cells = [r for r in rows if r["sampler"] == sampler and r["method"] == "pack" and r["steps"] == steps]
        calls = statistics.median(r["calls_per_step"] for r in cells)
        exact = sum(r["regen_nmse_db"] <= -60 for r in cells)
        out.append((f"`{sampler}`", how_inverted(sampler), f"{calls:.1f}", f"{exact} of {len(cells)}",
                    signed(statistics.median(r["regen_nmse_db"] for r in cells)),
                    signed(max(r["regen_nmse_db"] for r in cells))))
    out += reversible_sampler_row(steps)
    naive = [r for r in rows if r["method"] == "naive" and r["steps"] == steps]
    out.append(("naive (any)", "FlipSigmas + euler, the baseline", "1.0",
                f"{sum(r['regen_nmse_db'] <= -60 for r in naive)} of {len(naive)}",
                signed(statistics.median(r["regen_nmse_db"] for r in naive)),
                signed(max(r["regen_nmse_db"] for r in naive))))
    return table(("sampler", "inverted by", "model calls per step (median)", "cells at ≤ −60 dB",
                  "median dB", "worst dB"), out)


def reversible_results():
    """(file name, json) of the reversible suite: the full run where there is one, else the quick one."""
    name = "reversible.json" if (RESULTS / "reversible.json").exists() else "reversible.quick.json"
    return name, load(name)


def have_reversible_results():
    return any((RESULTS / n).exists() for n in ("reversible.json", "reversible.quick.json"))


def pending_if_no_reversible_results(generate):
    """A generator that writes a one-line placeholder until the reversible suite has run."""
    def run():
        return generate() if have_reversible_results() else "(not run yet: `make bench SUITE=reversible`)\n"
    return run


def reversible_sampler_row(steps):
    """The Reversible Sampler's own row for the sampler table: its algebraic inverse on the same mixtures."""
    if not have_reversible_results():
        return []
    name, data = reversible_results()
    cells = [r for r in data["rows"] if r["part"] == "analytic" and r["method"] == "capped" and r["steps"] == steps]
    cfgs = ", ".join(f"{c:g}" for c in sorted({r["cfg"] for r in cells}))
    return [("Reversible Sampler", f"its algebraic inverse (cfg {cfgs}; `{name}`)",
             f"{statistics.median(r['inverse_calls_per_step'] for r in cells):.1f}",
             f"{sum(r['regen_nmse_db'] <= -60 for r in cells)} of {len(cells)}",
             signed(statistics.median(r["regen_nmse_db"] for r in cells)),
             signed(max(r["regen_nmse_db"] for r in cells)))]


REVERSIBLE_CANDIDATES = ("capped", "capped_0.9", "capped_0.8", "capped_0.7", "o_belm", "bdia")


def reversible_analytic_table():
    """Sample error (NMSE to a 400-step dpmpp_2m reference) of euler and each candidate, with the spread of a
    photo's inverted start for capped at 1 and at 0.8."""
    rows = [r for r in reversible_results()[1]["rows"] if r["part"] == "analytic"]
    out = []
    for model, label in (("mixture_eps", "EPS karras"), ("mixture_flow", "flow shift 3")):
        for steps in sorted({r["steps"] for r in rows}):
            for cfg in sorted({r["cfg"] for r in rows if r["cfg"] >= 5}):
                pick = {r["method"]: r for r in rows if (r["model"], r["steps"], r["cfg"]) == (model, steps, cfg)}
                if not pick:
                    continue
                out.append((f"{label}, {steps}, cfg {cfg:g}", signed(pick["capped"]["euler_sample_error_db"]),
                            *(signed(pick[m]["sample_error_db"]) for m in REVERSIBLE_CANDIDATES),
                            f"{pick['capped']['photo_start_std_over_sigma']:g} / "
                            f"{pick['capped_0.8']['photo_start_std_over_sigma']:g}"))
    return table(("schedule, steps, cfg", "euler", *REVERSIBLE_CANDIDATES,
                  "photo's start std / sigma_max, capped / capped_0.8"), out)


def reversible_trained_table():
    rows = [r for r in reversible_results()[1]["rows"] if r["part"] == "round_trip"]
    return table(("model", "latent", "method", "steps", "cfg", "regenerated NMSE dB", "model calls per step",
                  "bit-identical rerun", "inversion s"),
                 [(r["model"], r["latent"], r["method"], r["steps"], f"{r['cfg']:g}", signed(r["regen_nmse_db"]),
                   f"{r['calls_per_step']:.1f}", {None: "-", True: "yes", False: "no"}[r["bit_identical"]],
                   f"{r['seconds']:.1f}") for r in rows])


def reversible_quality_table():
    rows = [r for r in reversible_results()[1]["rows"] if r["part"] in ("quality", "tree_ring")]
    quality = table(("model", "steps", "cfg", "samples", "class accuracy euler", "class accuracy reversible",
                     "mean pixel difference"),
                    [(r["model"], r["steps"], f"{r['cfg']:g}", r["samples"], f"{r['euler_accuracy']:.2f}",
                      f"{r['reversible_accuracy']:.2f}", f"{r['mean_pixel_difference']:.3f}")
                     for r in rows if r["part"] == "quality"])
    rings = table(("Tree-Ring, sd3_trained", "detection", "images per class", "AUC", "TPR at 1% FPR",
                   "model calls per detection"),
                  [(r["method"], r["detection"], r["n"], f"{r['auc']:.3f}", f"{r['tpr_at_1fpr']:.2f}",
                    r["model_calls_per_detection"]) for r in rows if r["part"] == "tree_ring"])
    return quality + "\n" + rings


def sampler_grid():
    """Per step count: cells at -60 dB and median calls per step, every sampler and cfg."""
    rows = [r for r in load("exact_samplers.json")["rows"] if r["method"] == "pack"]
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        cells = [r for r in rows if r["steps"] == steps]
        out.append((steps, f"{sum(r['regen_nmse_db'] <= -60 for r in cells)} of {len(cells)}",
                    f"{statistics.median(r['calls_per_step'] for r in cells):.1f}",
                    signed(statistics.median(r["regen_nmse_db"] for r in cells)),
                    signed(max(r["regen_nmse_db"] for r in cells))))
    return table(("steps", "cells at ≤ −60 dB", "median calls per step", "median dB", "worst dB"), out)


def decoder_table():
    rows = [r for r in load("decoder.json")["rows"] if r["model"] == "tiny_taesd_trained"]
    dtypes = {"float32": "", "float16": ", VAE in fp16", "bfloat16": ", VAE in bf16"}
    return table(("method", "NMSE_z dB", "PSNR dB", "true latent PSNR dB", "s", "extra MB", "iterations"),
                 [(r["name"] + dtypes[r["dtype"]], signed(r["nmse_z_db"]), f"{r['psnr_db']:.1f}",
                   f"{r['true_latent_psnr_db']:.1f}", f"{r['seconds']:.1f}", f"{r['peak_mem_mb']:.0f}",
                   r["iterations"]) for r in rows])


def decoder_real_table():
    """taef2 on real photos, fp32 rows (the full run's file once it exists, else the quick run's)."""
    name = "decoder_real.json" if (RESULTS / "decoder_real.json").exists() else "decoder_real.quick.json"
    rows = [r for r in load(name)["rows"] if r["dtype"] == "fp32" and r["part"] in ("photo", "protocol")]
    return table(("part", "px", "method", "median PSNR dB", "median NMSE_z dB", "s", "extra MB"),
                 [(r["part"], r["size"], r["label"], f"{r['psnr_db']:.2f}",
                   "" if r["nmse_db"] is None else signed(r["nmse_db"]), f"{r['seconds']:.1f}",
                   f"{r['peak_mem_mb']:.0f}") for r in rows])


EXACT_METHODS = {"naive": "naive (FlipSigmas + euler)", "exact_anderson": "exact, Anderson",
                 "exact_fixed_point": "exact, paper's fixed point"}


def exact_euler50_table():
    rows = [r for r in load("exact.json")["rows"]
            if r["part"] == "comfyui" and r["sampler"] == "euler" and r["steps"] == 50]
    return table(("model", "cfg", "method", "noise NMSE dB", "regenerated NMSE dB", "model calls"),
                 [(r["model"], r["cfg"], EXACT_METHODS[r["method"]], signed(r["noise_nmse_db"]),
                   signed(r["regen_nmse_db"]), r["model_calls"]) for r in rows])


TRAINED = {("sd15_trained", "euler"): "SD1.5-layout EPS UNet, euler (karras)",
           ("sd15_trained", "dpmpp_2m"): "SD1.5-layout EPS UNet, dpmpp_2m",
           ("sd3_trained", "euler"): "SD3-layout flow MMDiT, euler (simple)",
           ("sd3_trained", "dpmpp_2m"): "SD3-layout flow MMDiT, dpmpp_2m"}
TRAINED_COLUMNS = ((1.0, "real"), (3.0, "real"), (5.0, "real"), (5.0, "generated"), (7.5, "real"), (9.0, "real"))


def exact_trained_table():
    """Regenerated-latent NMSE exact / naive; bold where exact misses -40 dB."""
    rows = [r for r in load("exact_trained.json")["rows"] if r["part"] == "trained"]
    out = []
    for (model, sampler), label in TRAINED.items():
        cells = []
        for cfg, latent in TRAINED_COLUMNS:
            pick = {r["method"]: r for r in rows if (r["model"], r["sampler"], r["cfg"], r["latent"])
                    == (model, sampler, cfg, latent)}
            exact = signed(pick["exact"]["regen_nmse_db"])
            exact = f"**{exact}**" if pick["exact"]["regen_nmse_db"] > -40 else exact
            cells.append(f"{exact} / {signed(pick['naive']['regen_nmse_db'])} ({pick['exact']['calls_per_step']:.0f})")
        out.append((label, *cells))
    header = ["model, sampler"] + [f"cfg {c:g}" + (", generated" if latent == "generated" else "")
                                   for c, latent in TRAINED_COLUMNS]
    return table(header, out)


ROUTES = {"latent": "the generated latent", "vae_encode": "VAE Decode → 8-bit → VAE Encode",
          "decoder_inversion": "VAE Decode → 8-bit → Decoder Inversion"}


def watermark_trained_table():
    rows = load("watermark_trained.json")["rows"]
    keys = []
    for r in rows:
        key = (r["sampler"], r["steps"], r["route"], r["attack"])
        if key not in keys:
            keys.append(key)
    out = []
    for key in keys:
        pick = {r["method"]: r for r in rows if (r["sampler"], r["steps"], r["route"], r["attack"]) == key}
        naive, exact = pick["naive"], pick["exact"]
        route = ROUTES[key[2]].replace("8-bit", "JPEG 75") if key[3] == "jpeg75" else ROUTES[key[2]]
        out.append((f"{key[0]} {key[1]}", route, f"{naive['auc']:.3f} / {exact['auc']:.3f}",
                    f"{naive['tpr_at_1fpr']:.2f} / {exact['tpr_at_1fpr']:.2f}",
                    f"{exact['model_calls_per_detection']:,.0f}"))
    return table(("sampler", "route", "AUC naive / exact", "TPR at 1% FPR naive / exact",
                  "model calls per detection, exact"), out)


def watermark_table():
    rows = load("watermark.json")["rows"]
    out = [(f"{r['sampler']} {r['steps']}", r["method"], r["attack"], f"{r['auc']:.4g}", f"{r['tpr_at_1fpr']:.2f}",
            f"{r['model_calls_per_detection']:.0f}") for r in rows]
    return table(("sampler", "method", "attack", "AUC", "TPR at 1% FPR", "model calls per detection"), out)


def edits_masks_table():
    rows = [r for r in load("edits.json")["rows"] if r["method"] in ("rf", "exact") or r["mask"] != "none"
            or r["setting"] == load("edits.json")["summary"]["flowedit_defaults"]]
    out = [(r["method"], r["mask"], f"{r['target_hit_rate']:.3f}", f"{r['source_psnr_db']:.2f}",
            "" if r["outside_nmse_db"] is None else signed(r["outside_nmse_db"]),
            "" if r["seam_ratio"] is None else f"{r['seam_ratio']:.2f}", f"{r['model_calls']:.0f}") for r in rows]
    return table(("method (defaults)", "mask", "target hit rate", "source PSNR dB", "NMSE where mask = 0, dB (worst)",
                  "seam ratio", "model calls"), out)


def edits_flowedit_grid_table():
    rows = [r for r in load("edits.json")["rows"] if r["method"] == "flowedit" and r["mask"] == "none"]
    rows.sort(key=lambda r: (-r["target_hit_rate"], -r["source_psnr_db"]))
    out = [(r["setting"], f"{r['target_hit_rate']:.3f}", f"{r['target_probability']:.3f}",
            f"{r['source_psnr_db']:.2f}", f"{r['model_calls']:.0f}") for r in rows]
    return table(("FlowEdit setting (cfg source/target)", "target hit rate", "target probability",
                  "source PSNR dB", "model calls"), out)


GENERATORS = {"sampler-table": sampler_table, "sampler-grid": sampler_grid, "decoder": decoder_table, "decoder-real": decoder_real_table,
              "exact-euler50": exact_euler50_table, "exact-trained": exact_trained_table,
              "watermark": watermark_table, "watermark-trained": watermark_trained_table,
              "reversible-analytic": pending_if_no_reversible_results(reversible_analytic_table),
              "reversible-trained": pending_if_no_reversible_results(reversible_trained_table),
              "reversible-quality": pending_if_no_reversible_results(reversible_quality_table),
              "edits-masks": edits_masks_table, "edits-flowedit-grid": edits_flowedit_grid_table}


def regenerate(text):
    """`text` with every generated block rebuilt from the json files."""
    def rebuild(match):
        name = match["name"]
        if name not in GENERATORS:
            raise KeyError(f"no generator for block {name!r}")
        return match.group(1) + GENERATORS[name]() + match.group(4)
    return BLOCK.sub(rebuild, text)


def resolve(node, path):
    """Follow `path` (keys joined by dots; a key may itself contain dots; list indices are numbers)."""
    while path:
        if isinstance(node, list):
            head, _, path = path.partition(".")
            node = node[int(head)]
            continue
        keys = [k for k in node if path == k or path.startswith(k + ".")]
        if not keys:
            raise KeyError(path)
        key = max(keys, key=len)
        node, path = node[key], path[len(key) + 1:]
    return node


def figure_errors(text, where):
    """Each marked figure whose shown value differs from its json value rounded to the shown decimals."""
    errors, cache = [], {}
    for match in FIGURE.finditer(text):
        shown = match["value"].replace(MINUS, "-").replace(",", "")
        try:
            data = cache.setdefault(match["file"], load(match["file"]))
            value = resolve(data, match["path"])
        except (KeyError, IndexError, ValueError, OSError) as e:
            errors.append(f"{where}: {match.group(0)!r}: no such figure ({e})")
            continue
        value = float(value) * (100 if match["scale"] else 1)
        decimals = len(shown.partition(".")[2])
        if round(value, decimals) != float(shown) and f"{value:.{decimals}f}" != shown:
            errors.append(f"{where}: shows {shown}, {match['file']}:{match['path']} is {value!r}")
    return errors


def main(argv):
    check = "--check" in argv
    problems = []
    for document in DOCUMENTS:
        text = document.read_text()
        new = regenerate(text)
        if new != text:
            if check:
                problems.append(f"{document.relative_to(ROOT)}: generated tables differ from bench/results")
            else:
                document.write_text(new)
        problems += figure_errors(new, document.relative_to(ROOT))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
