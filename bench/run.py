"""`make bench SUITE=<name|all> [QUICK=1]`: run benchmark suites, each writing bench/results/<name>.json
(rows + summary + the machine it ran on), a .png plot and a markdown table on stdout.

A suite is a module bench/<name>.py with `main(quick: bool) -> dict`.
"""
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SUITES = ["decoder", "exact", "exact_samplers", "exact_trained", "models", "preciseinv", "rf", "watermark",
          "watermark_trained"]


def main(argv):
    names = SUITES if not argv or argv[0] == "all" else argv[0].split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        sys.exit(f"unknown SUITE {unknown}: choose from {SUITES} or all")
    quick = os.environ.get("QUICK", "") not in ("", "0")
    sys.path[:0] = [REPO, HERE]
    for name in names:
        start = time.time()
        print(f"\n## bench {name}{' (quick)' if quick else ''}\n", flush=True)
        importlib.import_module(name).main(quick)
        print(f"\n{name}: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
