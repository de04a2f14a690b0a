"""`make bench SUITE=reversible.flow [QUICK=1]`: why the reversible sampler's flow samples drift from euler's, and
the data-prediction variant (ddim_leapfrog) beside capped, in a real ComfyUI (in-process, CPU, float32, 1 thread).

  sample     tiny_sd3_trained (simple) from models/, prompt 'cat face', 4 seeds of 16x16 latents: NMSE (dB) of each
             sampler's sample to a 300-step euler reference at each cfg and step count; euler beside capped and
             ddim_leapfrog from the same noise (the two-step schemes' alternating mode grows with cfg)
  photo      tiny_sd3_trained and tiny_sd15_trained (karras): the cat-face photo through the checkpoint's VAE,
             inverted with Invert Latent's reversible method and regenerated with its second state; the
             regenerated NMSE and the inverted start's standard deviation over sigma_max
"""
import torch

from bench.common import in_process_comfy, markdown_table, publish, pyplot, save_figure
from bench.exact.trained import load_image
from bench.reversible import CHECKPOINTS, Pack
from tests.support.metrics import nmse_db

VARIANTS = ("capped", "ddim_leapfrog")
FULL = dict(cfgs=(1.0, 1.5, 2.0, 3.0, 5.0, 9.0), steps=(10, 20, 50), photo_cfgs=(1.0, 5.0, 9.0),
            photo_steps=(10, 20))
QUICK = dict(cfgs=(1.0, 2.0, 5.0), steps=(10, 20), photo_cfgs=(1.0, 5.0), photo_steps=(10,))
COLUMNS = ("part", "model", "method", "steps", "cfg", "sample_error_db", "regen_nmse_db", "start_std_over_sigma")


def sampler(pack, method):
    import comfy.samplers
    if method == "euler":
        return comfy.samplers.sampler_object("euler")
    return pack.rev.ReversibleKSampler(pack.ops.sample_reversible, {"variant": method, "gamma": pack.ops.GAMMA})


def sample_rows(runtime, grid):
    pack = Pack(runtime, *CHECKPOINTS["sd3_trained"])
    positive, negative = pack.encode("cat face"), pack.encode("")
    noise = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    empty, rows = {"samples": torch.zeros(4, 16, 16, 16)}, []
    for cfg in grid["cfgs"]:
        reference = pack.run(sampler(pack, "euler"), empty, cfg, pack.sigmas(300), positive, negative, noise)
        for steps in grid["steps"]:
            for method in ("euler",) + VARIANTS:
                out = pack.run(sampler(pack, method), empty, cfg, pack.sigmas(steps), positive, negative, noise)
                rows.append(dict(part="sample", model="sd3_trained", method=method, steps=steps, cfg=cfg,
                                 sample_error_db=round(float(nmse_db(out["samples"],
                                                                     reference["samples"]).max()), 1)))
                print(rows[-1], flush=True)
    return rows


def photo_rows(runtime, grid):
    rows = []
    for name, (ckpt, scheduler) in CHECKPOINTS.items():
        pack = Pack(runtime, ckpt, scheduler)
        positive, negative = pack.encode("cat face"), pack.encode("")
        real = pack.vae.encode(load_image())
        for method in VARIANTS:
            for cfg in grid["photo_cfgs"]:
                for steps in grid["photo_steps"]:
                    sigmas = pack.sigmas(steps)
                    with torch.inference_mode():
                        inverted = pack.rev.invert_latent_reversible(pack.model, positive, negative, cfg,
                                                                     {"samples": real}, sigmas.flip(0), variant=method)
                    options = {"variant": method, "gamma": pack.ops.GAMMA,
                               "second_state": pack.rev.read_second_state(inverted)}
                    back = pack.regenerate(pack.rev.ReversibleKSampler(pack.ops.sample_reversible, options), inverted,
                                           cfg, sigmas, positive, negative)
                    rows.append(dict(part="photo", model=name, method=method, steps=steps, cfg=cfg,
                                     regen_nmse_db=round(float(nmse_db(back, real).max()), 1),
                                     start_std_over_sigma=round(float(inverted["samples"].std() / sigmas[0]), 2)))
                    print(rows[-1], flush=True)
    return rows


def plot(rows, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), squeeze=False)
    for ax, steps in zip(axes.flat, (10, 20)):
        for method, marker in (("euler", "s-"), ("capped", "o-"), ("ddim_leapfrog", "^-")):
            pts = sorted((r["cfg"], r["sample_error_db"]) for r in rows
                         if r["part"] == "sample" and r["method"] == method and r["steps"] == steps)
            if pts:
                ax.plot(*zip(*pts), marker, label=method)
        ax.set(title=f"sd3_trained, {steps} steps (CPU fp32)", xlabel="cfg", ylabel="sample NMSE to reference, dB")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(quick=False):
    grid = QUICK if quick else FULL
    torch.set_num_threads(1)
    with in_process_comfy() as runtime:
        rows = sample_rows(runtime, grid) + photo_rows(runtime, grid)
    summary = {}
    for method in VARIANTS:
        for cfg in grid["cfgs"]:
            summary[f"{method}_worst_sample_error_minus_euler_db_cfg{cfg:g}"] = max(
                round(r["sample_error_db"] - e["sample_error_db"], 1) for r in rows for e in rows
                if r["part"] == e["part"] == "sample" and r["method"] == method and e["method"] == "euler"
                and (r["cfg"], r["steps"]) == (e["cfg"], e["steps"]) == (cfg, r["steps"]))
        for name in CHECKPOINTS:
            cells = [r for r in rows if r["part"] == "photo" and r["method"] == method and r["model"] == name]
            summary[f"{method}_{name}_worst_photo_round_trip_nmse_db"] = max(r["regen_nmse_db"] for r in cells)
            summary[f"{method}_{name}_worst_photo_start_std_over_sigma"] = max(r["start_std_over_sigma"] for r in cells)
    notes = ("tiny_sd3_trained (simple) and tiny_sd15_trained (karras) from models/, CPU, float32, 16x16 latents, "
             "prompt 'cat face'; sample_error_db is NMSE to a 300-step euler sample from the same noise (4 seeds); "
             "photo rows invert the cat-face photo's latent at 10 and 20 steps only (50 SD1.5 steps would take too "
             "long on one core). See the module docstring.")
    publish("reversible_flow", rows, summary, quick, notes, lambda path: plot(rows, path), COLUMNS)
    return summary
