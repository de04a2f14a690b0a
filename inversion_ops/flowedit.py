"""FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models"),
in ComfyUI's flow sigma (x = (1 - sigma)*x0 + sigma*noise, v = dx/dsigma = (x - D)/sigma). No inversion: an ODE
in the edit z is driven by the difference of the target and source velocities at coupled noisy points.
"""
import torch

from .common import CountedModel, check_sigmas, euler_step, per_sample_rms, report, work_dtype
from .rf import randn_per_sample, sample_generators

# the best of a measured grid on the trained tiny model: see docs/results.md#flowedit-defaults
STEPS, N_MAX, N_MIN, N_AVG, SOURCE_CFG, TARGET_CFG = 28, 6, 2, 1, 1.5, 1.5


def _velocity_gap(model, z_edit, x0, sigma, noise, source_args):
    """V_tar(z_tar) - V_src(z_src) at z_src = (1 - sigma)*x0 + sigma*noise, z_tar = z_edit + z_src - x0, written
    so that it is exactly 0 where z_edit = x0 and both predictions agree (a masked edit keeps the source there)."""
    z_src = (1 - sigma) * x0 + sigma * noise
    d_src = model(z_src, sigma, **source_args).to(x0.dtype)
    d_tar = model(z_src + (z_edit - x0), sigma).to(x0.dtype)     # = z_src exactly where nothing is edited yet
    return ((z_edit - x0) - (d_tar - d_src)) / sigma


@torch.no_grad()
def flow_edit(model, x, sigmas, extra_args=None, callback=None, disable=None, source=None, source_args=None,
              n_max=N_MAX, n_min=N_MIN, n_avg=N_AVG, seed=0, mask=None):
    """FlowEdit (Kulikov et al. 2024, Algorithm 1) over descending `sigmas` (T steps, the first T - n_max skipped).

    model(x, sigma, **extra_args) is the target prediction, with **source_args the source one. The source latent
    is `source` (else x). Steps above n_min integrate the mean velocity gap over n_avg fresh noises; the last n_min
    steps sample the target from the coupled point. `mask` (1 = edit) confines the edit; where it is 0 the output is
    x0 exactly; a value m in between edits over the last m of the edited steps (Differential Diffusion's reading of a
    soft mask, Levin & Fried 2024: fewer edited steps, not a cross-fade of two images)."""
    sigmas = check_sigmas(sigmas, ascending=False, unit_interval=True).to(x.device)
    model, source_args = CountedModel(model, extra_args), source_args or {}
    x0 = (x if source is None else source).to(device=x.device, dtype=work_dtype(x))
    mask = None if mask is None else mask.to(x0).expand_as(x0)
    steps, gens = len(sigmas) - 1, sample_generators(x.shape[0], seed)
    edit_steps = min(int(n_max), steps)
    first, edited = steps - edit_steps, edit_steps - min(int(n_min), edit_steps)
    z_edit, z_tar = x0.clone(), None
    for i in range(first, steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if i < steps - n_min:
            gap = 0.0
            for _ in range(int(n_avg)):
                noise = randn_per_sample(x0, gens)
                gap = gap + _velocity_gap(model, z_edit, x0, sigma, noise, source_args) / n_avg
            keep = 1.0 if mask is None else graded_mask(mask, i - first, edited)
            z_edit = z_edit + (sigma_next - sigma) * keep * gap        # Euler step of dZ = (V_tar - V_src) dsigma
            report(callback, i=i, x=z_edit, sigma=sigma, denoised=z_edit, residual=per_sample_rms(gap),
                   model_calls=model.calls)
            continue
        if z_tar is None:                                              # enter the plain sampling phase
            z_tar = z_edit + sigma * (randn_per_sample(x0, gens) - x0)
        denoised = model(z_tar, sigma).to(x0.dtype)
        report(callback, i=i, x=z_tar, sigma=sigma, denoised=denoised, model_calls=model.calls)
        z_tar = euler_step(z_tar, denoised, sigma, sigma_next)
    out = z_edit if z_tar is None else z_tar
    return out if mask is None else torch.where(mask > 0, out, x0)


def graded_mask(mask, step, edited):
    """Where edited step `step` of `edited` applies: mask >= 1 - step/edited, so a value m edits the last m of
    them, 1 all, 0 none (the tolerance keeps m = k/edited from losing a step to rounding)."""
    return (mask >= 1 - step / edited - 1e-6).to(mask.dtype)
