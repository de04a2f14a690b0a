"""Error measures for tests and benchmarks, per sample, in float32 (float64 stays)."""
import torch


def nmse_db(estimate, truth):
    """Normalised squared error in dB per sample: 10*log10(||estimate - truth||^2 / ||truth||^2)."""
    dtype = torch.promote_types(truth.dtype, torch.float32)
    err = (estimate.to(dtype) - truth.to(dtype)).flatten(1).pow(2).sum(1)
    ref = truth.to(dtype).flatten(1).pow(2).sum(1).clamp_min(1e-30)
    return 10 * torch.log10(err.clamp_min(1e-30) / ref)


def psnr_db(image, reference, peak=1.0):
    """PSNR in dB per sample for images in [0, peak]."""
    mse = (image.float() - reference.float()).flatten(1).pow(2).mean(1).clamp_min(1e-30)
    return 10 * torch.log10(peak ** 2 / mse)
