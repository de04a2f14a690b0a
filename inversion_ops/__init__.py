"""Pure-torch inversion algorithms (no ComfyUI imports), one flat function per method.

Each function takes callables (`denoise(x, sigma) -> x0`, `encode`, `decode`) plus sigmas
and returns `(result, InversionInfo)`.
"""
from .common import InversionInfo, nmse_db, per_sample_rms, psnr_db  # noqa: F401
