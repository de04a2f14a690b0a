"""Small shared helpers for the inversion functions: per-sample norms, stop masks, records.

Everything works on batches of shape (B, ...): tolerances are per element (an RMS over one
sample), so their meaning does not change with resolution or latent channels.
"""
from dataclasses import dataclass, field

import torch


def per_sample_rms(t):
    """Root-mean-square over every dim but the batch: shape (B,)."""
    return t.detach().float().flatten(1).pow(2).mean(1).sqrt()


def nmse_db(estimate, truth):
    """Normalised squared error in dB per sample: 10*log10(||estimate - truth||^2 / ||truth||^2)."""
    err = (estimate.float() - truth.float()).flatten(1).pow(2).sum(1)
    ref = truth.float().flatten(1).pow(2).sum(1).clamp_min(1e-30)
    return 10 * torch.log10(err.clamp_min(1e-30) / ref)


def psnr_db(image, reference, peak=1.0):
    """PSNR in dB per sample for images in [0, peak]."""
    mse = (image.float() - reference.float()).flatten(1).pow(2).mean(1).clamp_min(1e-30)
    return 10 * torch.log10(peak ** 2 / mse)


def batch_view(mask, like):
    """Broadcast a (B,) mask or vector over the trailing dims of `like`."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


def select(mask, new, old):
    """Per-sample choice: rows of `new` where mask is True, else rows of `old`."""
    return torch.where(batch_view(mask, new), new, old)


@dataclass
class InversionInfo:
    """What every inversion function returns beside its result, for nodes, tests and benchmarks."""
    model_calls: int = 0
    residuals: list = field(default_factory=list)   # per step (or iteration): list of per-sample floats
    iterations: list = field(default_factory=list)  # per step: iterations used (max over the batch)
    hit_cap: list = field(default_factory=list)     # per step: True where a sample stopped at the cap

    def final_residual(self):
        return self.residuals[-1] if self.residuals else []


def to_d(x, denoised, sigma):
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (k-diffusion's `to_d`)."""
    return (x - denoised) / batch_view(torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1), x)


def euler_step(x, denoised, sigma, sigma_next):
    """One DDIM / Euler step as ComfyUI's `sample_euler` computes it, in its sigma coordinates.

    The same arithmetic order as ComfyUI (x + d * dt), so eta = 0 or one-step checks match it to
    float precision. Valid for EPS, V_PREDICTION and CONST (flow): they differ only in D.
    """
    return x + to_d(x, denoised, sigma) * (sigma_next - sigma)
