"""Benchmark helpers for decoder inversion (no ComfyUI imports): time one method, score it against the
ground-truth latent, and keep an NMSE-vs-time trace so methods can be compared at equal accuracy.

    from bench.decoder_methods import run_method, time_to_reach
    ref = run_method("gradient", encode, decode, x, z0, torch.float32, max_iterations=100)
    res = run_method("momentum", encode, decode, x, z0, torch.float32, max_iterations=50)
    t = time_to_reach(res["trace"], ref["best_trace_nmse_db"])   # seconds, or None if never reached

NMSE_z as in the paper: per sample 10*log10(||z_hat - z0||^2 / ||z0||^2), then the mean over samples.
"""
import time

import torch

from inversion_ops.common import StepLog
from inversion_ops.decoder import METHODS
from tests.support.metrics import nmse_db, psnr_db


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruction_psnr(decode, z, x, dtype, clamp=(0.0, 1.0), peak=1.0):
    """PSNR per sample of D(z), the model in `dtype`, clamped to `clamp` (None: not clamped), against x."""
    with torch.no_grad():
        image = decode(z.to(dtype)).float()
        if clamp is not None:
            image = image.clamp(*clamp)
        return psnr_db(image, x.float(), peak=peak)


def run_method(name, encode, decode, x, z0, dtype, max_iterations, clamp=(0.0, 1.0), peak=1.0, **knobs):
    """Run METHODS[name] on images x (B, ...) whose true latent is z0, the model in `dtype` (the
    latent is float32 whatever it is); return a dict of:
    name, dtype, nmse_z_db (mean) and nmse_z_db_per_sample of the returned z, psnr_db (mean, of
    D(z_hat) clamped to `clamp` vs x, with `peak`), seconds (wall time of the inversion only, CUDA
    synchronised, the trace's own scoring subtracted), iterations (per sample), model_calls,
    residuals (per evaluation, per sample), trace [(seconds, mean NMSE dB of the current iterate)],
    best_trace_nmse_db, peak_mem_mb (CUDA max_memory_allocated during the run, weights included; None on CPU).
    `knobs` go to the method (rho, alpha, lr, tolerance, patience, ...); `max_iterations` and the knobs
    are ignored for "encoder" (but `residual`).
    """
    fn = METHODS[name]
    device = x.device
    trace, overhead = [], [0.0]
    start = [0.0]

    log = StepLog()

    def score(d):
        _sync(device)
        t_in = time.perf_counter()
        trace.append((t_in - start[0] - overhead[0], nmse_db(d["x"], z0).mean().item()))
        log(d)
        overhead[0] += time.perf_counter() - t_in

    if name == "encoder":                           # no iteration knobs; its residual costs 2 calls
        kwargs = dict(residual=knobs.get("residual", False))
    else:
        kwargs = dict(knobs, max_iterations=max_iterations)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start[0] = time.perf_counter()
    z = fn(encode, decode, x, score, dtype=dtype, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start[0] - overhead[0]
    if not trace:                                   # encoder without residual: one point at the end
        trace.append((seconds, nmse_db(z, z0).mean().item()))
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    psnr = reconstruction_psnr(decode, z, x, dtype, clamp, peak)
    per_sample = nmse_db(z, z0)
    return dict(
        name=name, dtype=str(dtype).replace("torch.", ""),
        nmse_z_db=per_sample.mean().item(), nmse_z_db_per_sample=per_sample.tolist(),
        psnr_db=psnr.mean().item(), seconds=seconds,
        iterations=log.records[-1]["iterations"] if log.records else [0] * x.shape[0],
        model_calls=log.model_calls if log.records else 1, residuals=log.residuals,
        trace=trace, best_trace_nmse_db=min(v for _, v in trace), peak_mem_mb=peak_mem,
    )


def time_to_reach(trace, target_db):
    """First time in a trace [(seconds, nmse_db)] at which NMSE <= target_db; None if never."""
    for t, v in trace:
        if v <= target_db:
            return t
    return None
