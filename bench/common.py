"""Shared benchmark helpers: the machine record, result files and markdown tables."""
import json
import os
import platform
import subprocess
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    """What the numbers were measured on, stored with every result file."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, cwd=os.path.dirname(RESULTS)).stdout.strip()
    except OSError:
        pass
    return info


def markdown_table(rows, columns, floatfmt="{:.2f}"):
    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name, rows, summary, quick, notes=""):
    """bench/results/<name>.json (or <name>.quick.json for QUICK runs)."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump({"suite": name, "quick": quick, "machine": machine(), "notes": notes,
                   "summary": summary, "rows": rows}, f, indent=1, default=float)
    return path


def publish(name, rows, summary, quick, notes, draw, columns, shown=None):
    """A suite's ending: bench/results/<name>.json, its figure (draw(path to <name>.png)), then the rows
    (`shown`, by default all) as a table and the summary on stdout."""
    write_results(name, rows, summary, quick, notes)
    draw(result_path(name, "png", quick))
    print(markdown_table(rows if shown is None else shown, columns, floatfmt="{:g}"))
    print("\nsummary:", summary)


def result_path(name, ext, quick):
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.{ext}")


def ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DDIM inversion as the PreciseInv paper's baseline runs it: every step is the pack's one naive
    step (the model at the current latent, labelled with the noisier sigma). Not ComfyUI's
    FlipSigmas + euler (inversion_ops.exact.naive_inversion), which labels it with the current sigma."""
    from inversion_ops.common import CountedModel, check_sigmas, naive_step, report, work_dtype
    sigmas, counted = check_sigmas(sigmas).to(x.device), CountedModel(model, extra_args)
    x = x.to(work_dtype(x))
    for i in range(len(sigmas) - 1):
        x = naive_step(counted, x, sigmas[i], sigmas[i + 1], {})
        report(callback, i=i, x=x, sigma=sigmas[i + 1], model_calls=counted.calls)
    return x


def _status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


class PeakMemory:
    """Peak memory above the level at creation, in MiB: torch.cuda.max_memory_allocated on a GPU, else
    the peak RSS (VmHWM, reset to the current RSS through /proc/self/clear_refs). One per process."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = _status_kb("VmRSS") / 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _status_kb("VmHWM") / 1024 - self.base
