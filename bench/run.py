"""`make bench SUITE=<name>[,<name>...]|all [QUICK=1]`, or from the repository root with ComfyUI provisioned
(`eval "$(bash tools/provision.sh)"`): `QUICK=1 $COMFY_PYTHON -m bench <name>`.

A name is a suite (all its parts), a part as <suite>.<part>, or a part's result name. Each part is a module
with `main(quick: bool) -> dict` that writes bench/results/<result name>.json (rows + summary + the machine it
ran on; .quick.json for QUICK runs), a .png plot and a markdown table on stdout.
"""
import importlib
import os
import subprocess
import sys
import time

# suite -> {part: (module under bench/, result name)}; a suite of one part names it after itself
SUITES = {
    "decoder": {"decoder": ("decoder", "decoder")},
    "decoder_real": {"decoder_real": ("decoder_real", "decoder_real")},
    "edits": {"edits": ("edits", "edits")},
    "exact": {"euler_dpmpp": ("exact.euler_dpmpp", "exact"), "samplers": ("exact.samplers", "exact_samplers"),
              "trained": ("exact.trained", "exact_trained")},
    "models": {"models": ("models", "models"), "flux2": ("models_flux2", "models_flux2")},
    "preciseinv": {"preciseinv": ("preciseinv", "preciseinv")},
    "reversible": {"reversible": ("reversible", "reversible"),
                   "flow": ("reversible_flow", "reversible_flow")},
    "rf": {"rf": ("rf", "rf")},
    "watermark": {"watermark": ("watermark", "watermark")},
    "watermark_trained": {"watermark_trained": ("watermark_trained", "watermark_trained")},
    "watermark_real": {"watermark_real": ("watermark_real", "watermark_real")},
}


def parts(name):
    """The (module, result name) pairs a SUITE word names."""
    if name in SUITES:
        return list(SUITES[name].values())
    suite, _, part = name.partition(".")
    if part in SUITES.get(suite, {}):
        return [SUITES[suite][part]]
    return [p for suite_parts in SUITES.values() for p in suite_parts.values() if p[1] == name]


def main(argv):
    names = list(SUITES) if not argv or argv[0] == "all" else argv[0].split(",")
    chosen = [parts(n) for n in names]
    if not all(chosen):
        known = [f"{s}.{p}" for s, ps in SUITES.items() for p in ps if len(ps) > 1]
        sys.exit(f"unknown SUITE {[n for n, c in zip(names, chosen) if not c]}: choose from {list(SUITES)}, "
                 f"{known} or all")
    quick = os.environ.get("QUICK", "") not in ("", "0")
    chosen = [p for c in chosen for p in c]
    if len(chosen) > 1:   # one process per part: an in-process ComfyUI fixes its base directory once per process
        keys = {p: f"{suite}.{part}" for suite, ps in SUITES.items() for part, p in ps.items()}
        for part in chosen:   # a suite.part key names exactly one part, so the child never recurses
            subprocess.run([sys.executable, "-m", "bench", keys[part]], check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return
    for module, result in chosen:
        start = time.time()
        print(f"\n## bench {result}{' (quick)' if quick else ''}\n", flush=True)
        importlib.import_module(f"bench.{module}").main(quick)
        print(f"\n{result}: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
