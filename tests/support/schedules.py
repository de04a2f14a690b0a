"""Noise schedules for the analytic models, as ComfyUI computes them, in float64 (tests and benchmarks)."""
import torch


def karras_sigmas(steps, sigma_min=0.0292, sigma_max=14.6146, rho=7.0):
    """ComfyUI's karras schedule for an SD1.5-like EPS model, descending, ending at 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def flow_sigmas(steps, shift=3.0, dtype=torch.float64, ascending=False):
    """SD3-style shifted flow schedule from exactly 1.0 to 0 (or 0 to 1: linspace's rounding depends on the
    direction, so each caller keeps the one its results were measured with)."""
    t = torch.linspace(0, 1, steps + 1, dtype=dtype) if ascending else torch.linspace(1, 0, steps + 1, dtype=dtype)
    return shift * t / (1 + (shift - 1) * t)
