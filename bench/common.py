"""What every suite shares: the machine record, result files and tables, SD1.5's simple schedule, random
conditioning and the DDIM baseline. Error measures come from tests/support/metrics.py (nmse_db, psnr_db)."""
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")


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


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110, **layout):
    """Lay out (tight_layout(**layout)), write and close a figure."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def nmse_vs_cfg_axes(ax, title, floor_db):
    """Label one regenerated-NMSE-against-cfg panel, with a dotted line at the floor the suite aims for."""
    ax.axhline(floor_db, color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("cfg")
    ax.set_ylabel("regen NMSE dB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


@contextlib.contextmanager
def in_process_comfy():
    """A real in-process ComfyUI in a temporary base directory (tests/support/comfy_runtime.InProcessComfy)."""
    from tests.support.comfy_runtime import InProcessComfy
    with tempfile.TemporaryDirectory() as base:
        yield InProcessComfy(base)


def find_row(rows, **match):
    """The first row whose fields equal `match`, or None."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[0] if hits else None


def result_path(name, ext, quick):
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.{ext}")


def sd15_simple_sigmas(steps):
    """ComfyUI's 'simple' scheduler on SD1.5's scaled-linear schedule, descending, ending at 0 (float64)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    stride = len(sigmas) / steps
    return torch.tensor([float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0], dtype=torch.float64)


def conditioning(width, pooled, seed, batch=1, tokens=8, scale=1.0, pooled_first=True):
    """Seeded random ComfyUI conditioning [[cond (batch, tokens, width), {"pooled_output": (batch, pooled)}]]
    (no pooled output where pooled is 0). pooled_first: the order the two are drawn from the generator
    (the rf suite and tools/sampler_table.py draw cond first; their recorded results depend on it)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cond": (batch, tokens, width), "pooled_output": (batch, pooled)}
    order = ("pooled_output", "cond") if pooled_first else ("cond", "pooled_output")
    drawn = {name: scale * torch.randn(shapes[name], generator=g) for name in order if pooled or name == "cond"}
    return [[drawn.pop("cond"), drawn]]


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
