"""`make bench SUITE=rf [QUICK=1]`: RF-Inversion on the analytic flow Gaussian mixture and on the tiny
SD3-layout and Flux models running in a real ComfyUI (in-process, CPU, float32, 1 thread), and on the
trained tiny SD3-layout model (models/README.md) for the gamma0 and noise parts.

Parts (rows carry "part" and "model"):
  analytic-*  bench/rf_analytic.py (exact model): gamma 0 vs plain, noise statistics, eta sweep
  gamma0      tiny models through the pack's SAMPLERs and run_sampler: gamma 0 forward vs plain ODE
              inversion (rf_analytic.plain_ode_inversion, written apart from inversion_ops.rf, run by the
              pack's InversionKSampler), eta 0 reverse vs ComfyUI's own euler (InvertedNoise start), round trip
  noise       inverted-noise mean / std / kurtosis of a flat colour and a checkerboard latent vs gamma
  eta         distance of the output to the reference latent vs eta (target prompt, gamma 0.5)
  edit        the edit-node defaults: for a grid of gamma / eta / stop, how far the edit moves from
              the source relative to a plain target generation, and how much coarse layout it keeps
  overhead    seconds per step of each controlled sampler beside ComfyUI's euler, same model and
              latent, interleaved repeats, median, CPU time of this process
Writes bench/results/rf.json (or rf.quick.json) and rf.png (distance to the reference vs eta).
"""
import statistics
import tempfile
import time

import torch

from bench import common, rf_analytic
from bench.common import markdown_table, pyplot, result_path, save_figure, write_results
from inversion_ops.rf import controlled_forward, controlled_reverse
from tests.support.analytic import GaussianMixtureDenoiser
from tests.support.metrics import nmse_db

GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def rms(t):
    return t.double().flatten(1).pow(2).mean(1).sqrt()


def layout_corr(a, b):
    """Per-sample correlation of 2x2 average-pooled latents: how much coarse layout a keeps of b."""
    pa, pb = (torch.nn.functional.avg_pool2d(t.double(), 2).flatten(1) for t in (a, b))
    pa, pb = pa - pa.mean(1, keepdim=True), pb - pb.mean(1, keepdim=True)
    return (pa * pb).sum(1) / (pa.norm(dim=1) * pb.norm(dim=1)).clamp_min(1e-30)


def atypical(shape, n):
    """A flat colour and a checkerboard in the model's latent space, n rows each."""
    data = rf_analytic.inputs(_ConstantSampler(shape), shape, n)
    return {k: v for k, v in data.items() if k != "typical"}


class _ConstantSampler:
    def __init__(self, shape):
        self.shape = shape

    def sample(self, n, generator=None):
        return torch.zeros(n, *self.shape)


class AnalyticBackend:
    """The closed-form mixture: source prompt = mixture A, target prompt = mixture B."""

    def __init__(self, shape, steps):
        self.name, self.shape = "analytic GMM flow", shape
        self.conds = {"source": GaussianMixtureDenoiser.random(shape=shape, components=3, seed=0,
                                                               parameterization="flow"),
                      "target": GaussianMixtureDenoiser.random(shape=shape, components=3, seed=5,
                                                               parameterization="flow")}
        self.up = rf_analytic.flow_schedule(steps, shift=3.0)
        self.down = self.up.flip(0)

    def source_latents(self, n):
        return self.conds["source"].sample(n, generator=torch.Generator().manual_seed(1)).float()

    def invert(self, x, gamma, seed=0):
        return controlled_forward(self.conds["source"], x, self.up, gamma=gamma, seed=seed)

    def regen(self, noise, reference, cond, eta, stop):
        return controlled_reverse(self.conds[cond], noise, self.down, reference=reference, eta=eta, start=0.0,
                                  stop=stop)

    def fresh(self, n, cond, seed):
        noise = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed))
        return self.regen(noise, noise, cond, 0.0, 0.25)

    def model_space(self, x):
        return x


class ComfyBackend:
    """A tiny ComfyUI flow model driven through the pack's SAMPLERs and run_sampler (user-space
    LATENTs in and out, like the nodes); statistics are taken in the model's own latent space."""

    def __init__(self, name, model, family, steps, pack):
        self.name, self.model, self.pack = name, model, pack
        channels = model.get_model_object("latent_format").latent_channels
        self.shape = (channels, 8, 8)
        self.conds = {"source": conditioning(family, 1), "target": conditioning(family, 9, scale=3.0)}
        self.up = pack["sigmas"].inversion_sigmas(model, "simple", steps)
        self.down = self.up.flip(0)

    def _run(self, cond, latent, sampler, sigmas, noise=None):
        c = self.conds[cond]
        return self.pack["sampling"].run_sampler(self.model, c, c, 1.0, {"samples": latent}, sampler, sigmas,
                                                 noise=noise)["samples"]

    def source_latents(self, n):
        return self.fresh(n, "source", seed=1)

    def fresh(self, n, cond, seed):
        import comfy.samplers
        noise = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed))
        return self._run(cond, torch.zeros_like(noise), comfy.samplers.ksampler("euler"), self.down, noise=noise)

    def invert(self, x, gamma, seed=0):
        return self._run("source", x, self.pack["rf"].ControlledFlowSampler("forward", gamma=gamma, seed=seed), self.up)

    def invert_plain(self, x):
        sampler = self.pack["sampling"].InversionKSampler(rf_analytic.plain_ode_inversion, {})
        return self._run("source", x, sampler, self.up)

    def regen(self, noise, reference, cond, eta, stop):
        sampler = self.pack["rf"].ControlledFlowSampler("reverse", reference=reference, eta=eta, start=0.0, stop=stop)
        return self._run(cond, noise, sampler, self.down)

    def regen_euler(self, noise, cond):
        import comfy.samplers
        start = self.pack["sampling"].InvertedNoise(self.model, noise).generate_noise({"samples": noise})
        return self._run(cond, noise, comfy.samplers.ksampler("euler"), self.down, noise=start)

    def model_space(self, x):
        return self.model.model.process_latent_in(x.clone())


def conditioning(family, seed, scale=1.0):
    width, pooled = {"sd3": (4096, 2048), "flux": (64, 32)}[family]
    return common.conditioning(width, pooled, seed, scale=scale, pooled_first=False)


def gamma0_rows(b, n):
    x0 = b.source_latents(n)
    t0 = time.perf_counter()
    controlled, plain = b.invert(x0, 0.0), b.invert_plain(x0)
    back = b.regen(controlled, x0, "source", 0.0, 0.25)
    euler = b.regen_euler(plain, "source")
    return [{"part": "gamma0", "model": b.name, "steps": len(b.up) - 1,
             "noise_gamma0_vs_plain_nmse_db": nmse_db(controlled, plain).max().item(),
             "regen_eta0_vs_comfy_euler_nmse_db": nmse_db(back, euler).max().item(),
             "round_trip_vs_source_nmse_db": nmse_db(back, x0).mean().item(),
             "seconds": time.perf_counter() - t0}]


def noise_rows(b, n):
    rows = []
    for name, x in atypical(b.shape, n).items():
        latent = x if isinstance(b, AnalyticBackend) else b.model.model.process_latent_out(x.clone())
        for gamma in GAMMAS:
            mean, std, kurt = rf_analytic.moments(b.model_space(b.invert(latent, gamma)))
            rows.append({"part": "noise", "model": b.name, "input": name, "gamma": gamma, "mean": mean, "std": std,
                         "kurtosis": kurt})
    return rows


def eta_rows(b, n, etas):
    x0 = b.source_latents(n)
    noise = b.invert(x0, 0.5)
    rows = []
    for stop in (0.25, 1.0):
        for eta in etas:
            out = b.regen(noise, x0, "target", eta, stop)
            rows.append({"part": "eta", "model": b.name, "gamma": 0.5, "stop": stop, "eta": eta,
                         "rms_to_reference": rms(b.model_space(out) - b.model_space(x0)).mean().item()})
    return rows


def edit_rows(b, n, grid):
    """How far an edit moves: edit_fraction = |edit - source| / |fresh target generation - source|
    (0: unchanged, 1: as far as generating the target prompt from scratch); layout = correlation
    of 2x2-pooled latents with the source (a fresh generation's value is the baseline)."""
    x0 = b.source_latents(n)
    src = b.model_space(x0)
    fresh = b.model_space(b.fresh(n, "target", seed=7))
    far = rms(fresh - src)
    rows = []
    for gamma in grid["gamma"]:
        noise = b.invert(x0, gamma)
        no_control = b.model_space(b.regen(noise, x0, "target", 0.0, 0.25))
        for eta in grid["eta"]:
            for stop in grid["stop"]:
                edit = b.model_space(b.regen(noise, x0, "target", eta, stop))
                rows.append({"part": "edit", "model": b.name, "steps": len(b.up) - 1, "gamma": gamma, "eta": eta,
                             "stop": stop, "edit_fraction": (rms(edit - src) / far).mean().item(),
                             "no_control_fraction": (rms(no_control - src) / far).mean().item(),
                             "layout_corr": layout_corr(edit, src).mean().item(),
                             "fresh_layout_corr": layout_corr(fresh, src).mean().item()})
    return rows


def overhead_rows(name, model, family, pack, side, steps, repeats):
    """Seconds per step, each controlled sampler beside ComfyUI's euler, interleaved repeats, median.
    The ratio uses this process's CPU time (1 thread): on a shared machine wall time mostly
    measures the other processes; wall time is kept in the rows."""
    import comfy.samplers
    rf, sampling = pack["rf"], pack["sampling"]
    channels = model.get_model_object("latent_format").latent_channels
    latent = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0))
    cond = conditioning(family, 1)
    up = pack["sigmas"].inversion_sigmas(model, "simple", steps)
    down = up.flip(0)
    runs = {
        "comfy euler": lambda: sampling.run_sampler(model, cond, cond, 1.0, {"samples": torch.zeros_like(latent)},
                                                    comfy.samplers.ksampler("euler"), down, noise=latent),
        "rf forward ode": lambda: sampling.run_sampler(model, cond, cond, 1.0, {"samples": latent},
                                                       rf.ControlledFlowSampler("forward", gamma=0.5), up),
        "rf reverse ode": lambda: sampling.run_sampler(model, cond, cond, 1.0, {"samples": latent},
                                                       rf.ControlledFlowSampler("reverse", reference=latent), down),
        "rf reverse sde": lambda: sampling.run_sampler(model, cond, cond, 1.0, {"samples": latent},
                                                       rf.ControlledFlowSampler("reverse", mode="sde",
                                                                                reference=latent), down),
        "rf forward sde": lambda: sampling.run_sampler(model, cond, cond, 1.0, {"samples": latent},
                                                       rf.ControlledFlowSampler("forward", mode="sde"), up),
    }
    for run in runs.values():   # warm-up: model load, first-call allocations
        run()
    cpu, wall = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            cpu[key].append((time.process_time() - c0) / steps)
            wall[key].append((time.perf_counter() - t0) / steps)
    base = statistics.median(cpu["comfy euler"])
    return [{"part": "overhead", "model": f"{name} {channels}x{side}x{side} fp32", "sampler": key, "steps": steps,
             "repeats": repeats, "cpu_s_per_step": statistics.median(cpu[key]),
             "wall_s_per_step": statistics.median(wall[key]), "ratio_to_euler": statistics.median(cpu[key]) / base,
             "model_calls_per_step": 0 if key == "rf forward sde" else 1}
            for key in runs]


def plot(rows, path):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    eta = [r for r in rows if r["part"] == "eta"]
    for model in dict.fromkeys(r["model"] for r in eta):
        for stop, style in ((0.25, "-"), (1.0, "--")):
            sel = [r for r in eta if r["model"] == model and r["stop"] == stop]
            if sel:
                base = sel[0]["rms_to_reference"]
                ax.plot([r["eta"] for r in sel], [r["rms_to_reference"] / base for r in sel], style, marker="o",
                        label=f"{model}, stop {stop}")
    ax.set(xlabel="eta", ylabel="RMS distance to reference / value at eta 0",
           title="Reverse: distance to the reference latent vs eta")
    ax.legend(fontsize=7)
    noise = [r for r in rows if r["part"] == "noise"]
    for model in dict.fromkeys(r["model"] for r in noise):
        for inp in dict.fromkeys(r["input"] for r in noise):
            sel = [r for r in noise if r["model"] == model and r["input"] == inp]
            ax2.plot([r["gamma"] for r in sel], [r["std"] for r in sel], marker="o", label=f"{model}, {inp}")
    ax2.axhline(1.0, color="gray", lw=0.5)
    ax2.set(xlabel="gamma", ylabel="std of the inverted noise", title="Forward: atypical inputs vs gamma")
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def _analytic_part(quick):
    rows = []
    for r in rf_analytic.run(quick):
        rows.append({"model": "analytic GMM flow", **r, "part": f"analytic-{r['part']}"})
    return rows


def main(quick: bool = False):
    torch.set_num_threads(1)
    steps = 12 if quick else 28
    n = 2
    etas = (0.0, 0.25, 0.5, 0.75, 1.0) if quick else tuple(i / 10 for i in range(11))
    grid = ({"gamma": (0.5,), "eta": (0.9, 1.0), "stop": (0.1, 0.25, 0.5)} if quick else
            {"gamma": (0.3, 0.5, 0.7), "eta": (0.7, 0.9, 1.0), "stop": (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)})
    rows = _analytic_part(quick)
    analytic = AnalyticBackend((16, 8, 8), steps)
    rows += noise_rows(analytic, n) + eta_rows(analytic, n, etas) + edit_rows(analytic, n, grid)

    from tests.support.comfy_runtime import InProcessComfy
    runtime = InProcessComfy(tempfile.mkdtemp(prefix="bench_rf_"))
    torch.set_num_threads(1)
    with torch.inference_mode():   # as ComfyUI's executor runs every node (no autograd graph)
        rows += _comfy_part(runtime, quick, steps, n, etas, grid)

    summary = summarize(rows)
    notes = ("CPU float32, 1 thread, tiny random-weight models and the trained tiny SD3 (gamma0 and noise parts; "
             "8x8 latents, 2 samples) and the closed-form Gaussian mixture; the tiny models' target prompt is random conditioning of scale 3. Distances "
             "are in each model's own latent space (process_latent_in). Tiny-model parts run under "
             "torch.inference_mode(), as ComfyUI runs nodes. Overhead: median of interleaved repeats, ratio of process CPU time (wall time in the rows; the machine was shared).")
    path = write_results("rf", rows, summary, quick, notes)
    plot(rows, result_path("rf", "png", quick))
    print_tables(rows, summary)
    print(f"\nwrote {path}")
    return summary


def _comfy_part(runtime, quick, steps, n, etas, grid):
    rows = []
    import comfy.sd
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False   # run_sampler's tqdm bars would flood the table output
    import folder_paths
    from tests.support.tiny_models import tiny_flux_model
    pack = {k: runtime.pack_module(f"nodes.{k}") for k in ("rf", "sampling", "sigmas")}
    sd3 = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models",
                                                                            "tiny_sd3_flow.safetensors"))
    models = [("tiny SD3 (MMDiT, shift 3)", sd3, "sd3"), ("tiny Flux", tiny_flux_model(), "flux")]
    for name, model, family in models:
        b = ComfyBackend(name, model, family, steps, pack)
        rows += gamma0_rows(b, n) + noise_rows(b, n) + eta_rows(b, n, etas) + edit_rows(b, n, grid)
    # the trained MMDiT (models/README.md) beside them: exactness and noise statistics; its captioned edits are
    # measured in bench/models.py (the RF edit sweep, bench/results/models.json)
    trained = runtime.nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd3_trained.safetensors")[0]
    b = ComfyBackend("trained SD3 (emoji MMDiT, random conditioning)", trained, "sd3", steps, pack)
    rows += gamma0_rows(b, n) + noise_rows(b, n)
    side, ov_steps, repeats = (32, 10, 3) if quick else (64, 20, 5)
    for name, model, family in models:
        rows += overhead_rows(name, model, family, pack, side, ov_steps, repeats)
    return rows


def summarize(rows):
    g0 = [r for r in rows if r["part"] == "gamma0"]
    worst_db = max(max(r["noise_gamma0_vs_plain_nmse_db"], r["regen_eta0_vs_comfy_euler_nmse_db"]) for r in g0)
    an = [r for r in rows if r["part"] == "analytic-roundtrip"]
    g1 = [r for r in rows if r["part"] == "noise" and r["gamma"] == 1.0]
    worst_std = max(g1, key=lambda r: abs(r["std"] - 1.0))["std"]
    eta = [r for r in rows if r["part"] == "eta"]
    monotone = True
    for key in dict.fromkeys((r["model"], r["stop"]) for r in eta):
        d = [r["rms_to_reference"] for r in eta if (r["model"], r["stop"]) == key]
        monotone &= all(b <= a + 1e-9 for a, b in zip(d, d[1:]))
    overhead = [r for r in rows if r["part"] == "overhead" and r["model_calls_per_step"] == 1
                and r["sampler"] != "comfy euler"]
    edit = [r for r in rows if r["part"] == "edit"]
    return {
        "gamma0_vs_plain_nmse_db": worst_db,
        "analytic_gamma0_vs_plain_max_abs": max(r["gamma0_vs_plain_max_abs"] for r in an),
        "gamma1_noise_std": worst_std,
        "gamma1_noise_std_all": {f"{r['model']} / {r['input']}": round(r["std"], 4) for r in g1},
        "eta_monotone": bool(monotone),
        "overhead_ratio": max(r["ratio_to_euler"] for r in overhead),
        "overhead_ratio_median": statistics.median(r["ratio_to_euler"] for r in overhead),
        "overhead_ratio_wall": max(r["wall_s_per_step"] / next(e["wall_s_per_step"] for e in rows
                                                               if e["part"] == "overhead" and e["model"] == r["model"]
                                                               and e["sampler"] == "comfy euler")
                                   for r in overhead),
        "overhead_ratio_by_sampler": {f"{r['model']} / {r['sampler']}": round(r["ratio_to_euler"], 3)
                                      for r in overhead},
        "edit_defaults_measured": edit_summary(edit),
        "edit_defaults_chosen": choose_defaults(edit),
    }


def choose_defaults(edit, min_change=0.3):
    """The (gamma, eta, stop) whose edit moves at least `min_change` of a fresh target generation's
    distance on every model (a visible edit) and whose mean edit_fraction is closest to 0.5 (half
    way: the source's layout still dominates); ties go to the higher layout correlation."""
    summary = edit_summary(edit)
    ok = {k: v for k, v in summary.items() if v["min_edit_fraction"] >= min_change}
    if not ok:
        return None
    best = min(ok, key=lambda k: (abs(ok[k]["edit_fraction"] - 0.5), -ok[k]["layout_corr"]))
    return {"config": best, **ok[best]}


def edit_summary(edit):
    """Per (gamma, eta, stop): edit_fraction and layout_corr averaged over the models."""
    out = {}
    for key in dict.fromkeys((r["gamma"], r["eta"], r["stop"]) for r in edit):
        sel = [r for r in edit if (r["gamma"], r["eta"], r["stop"]) == key]
        out[f"gamma {key[0]} eta {key[1]} stop {key[2]}"] = {
            "edit_fraction": round(sum(r["edit_fraction"] for r in sel) / len(sel), 3),
            "min_edit_fraction": round(min(r["edit_fraction"] for r in sel), 3),
            "layout_corr": round(sum(r["layout_corr"] for r in sel) / len(sel), 3)}
    return out


def print_tables(rows, summary):
    for part in dict.fromkeys(r["part"] for r in rows):
        sel = [r for r in rows if r["part"] == part]
        cols = list(dict.fromkeys(k for r in sel for k in r if k != "part"))
        print(f"\n### {part}\n")
        print(markdown_table(sel, cols, floatfmt="{:.4g}"))
    print("\n### summary\n")
    for k, v in summary.items():
        if not isinstance(v, dict):
            print(f"- {k}: {v}")
