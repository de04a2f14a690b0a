"""Decoder inversion: find z with D(z) = x, given an encoder E and a decoder D (Hong et al., NeurIPS 2024).

Every method is one function `invert_x(encode, decode, x, callback=None, disable=None, **options) -> z`:
- `encode(x) -> z` and `decode(z) -> x` are plain callables on batches (B, ...) whose rows are
  independent. They run in `dtype` (default: x's): they are called with `t.to(dtype)` and their
  outputs are cast back to the work dtype, so the iterate z, E(x), the residual and Adam's moments
  are float32 (float64 stays float64, `common.work_dtype`) whatever dtype the model runs in.
- The gradient-free methods iterate on the residual T(z) = E(D(z)) - E(x) from z0 = E(x) under
  `torch.no_grad()`; only `invert_gradient` uses autograd (w.r.t. z only: weights get no .grad).
- Stopping is per sample: a sample stops when the RMS of its residual (per element, so `tolerance`
  does not change meaning with resolution) is <= `tolerance`, after `patience` evaluations without
  a new best, or after `max_iterations` updates; a stopped sample is no longer sent through the model.
- None of these iterations is monotone, so each sample's lowest-residual iterate is returned.
- After every evaluation `callback` gets a dict (`common.report`; `common.StepLog` records it):
  `i`, `x` (the iterate just evaluated, whole batch: stopped samples keep their last), the per-sample
  (B,) tensors `residual` (RMS; stopped samples repeat their last value), `best_residual`,
  `iterations` (updates applied), `best_iteration`, `hit_cap` (tolerance not reached yet) and
  `active`, and the running counts `model_calls` (encode + decode calls) and `model_calls_backward`
  (backward passes through D, gradient method only). Raise in it to interrupt.
- Every tensor lives on x's device; each iteration makes one host sync (which samples are active).
"""
import math
import numbers

import torch

from .common import per_sample_rms, report, select, work_dtype

# Defaults and policy, in one place; the node reads them for its inputs.
METHOD_NAMES = ("forward_step", "momentum", "adam_residual", "gradient", "encoder")   # the node's order
METHOD = "forward_step"
MAX_ITERATIONS = 50          # updates per sample (forward_step, momentum and the node)
ADAM_MAX_ITERATIONS = 100    # adam_residual / gradient called directly: the authors' schedule spans 100
TOLERANCE = 1e-4             # RMS per element of E(D(z)) - E(x), raw latent units
GRADIENT_TOLERANCE = 0.0     # the gradient method's residual D(z) - x is in pixel units: run every iteration
DEFAULT_STEP = {"forward_step": 0.5, "momentum": 0.5, "adam_residual": 0.01, "gradient": 0.01}
STEP_OPTION = {"forward_step": "rho", "momentum": "rho", "adam_residual": "lr", "gradient": "lr"}
MOMENTUM = 0.3               # inertia alpha: with rho 0.5 a 2x margin in Theorem 2 for beta = 1
COCOERCIVITY = 1.0           # beta: exact when E is D's left-inverse, an assumption for a real VAE
ADAM_EPS = 1e-8              # Adam's moments are float32, so 1e-8 does not underflow
# precision "auto": float32 for every method, whatever the VAE's dtype. On the trained tiny TAESD
# (bench/results/decoder.json, CPU) the model in fp16 ends 3.1 dB and in bf16 18.5 dB above fp32's
# NMSE even with a float32 iterate (its rounding sets the residual's floor), and the gradient method's
# backward pass underflows in 16 bit. A 16-bit VAE then runs on a float32 copy of its weights.
AUTO_DTYPE = torch.float32


def cosine_warmup_lr(i, max_iterations, lr, warmup):
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 at `max_iterations`."""
    if i < warmup:
        return lr * (i + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, max_iterations - warmup)))


def authors_lr(i, max_iterations, lr):
    """The schedule of the authors' released gradient-free Adam: C = min(max_iterations, 100), warm-up
    C//10, cosine over C but held at its value from iteration ceil(0.8 C) - 1 on (about 0.13 lr for C = 100)."""
    c = min(max_iterations, 100)
    return cosine_warmup_lr(min(i, math.ceil(0.8 * c) - 1), c, lr, c // 10)


def inertial_km_max_rho(alpha, beta=COCOERCIVITY):
    """Largest step rho = 2*lambda*beta that Theorem 2 allows: lambda < (1 - alpha)^2 / (1 - alpha + 2 alpha^2)."""
    return 2 * beta * (1 - alpha) ** 2 / (1 - alpha + 2 * alpha ** 2)


def check_inertial_km(alpha, rho, beta=COCOERCIVITY):
    """Raise ValueError unless (alpha, rho) satisfy Theorem 2 of Hong et al. (2024) for cocoercivity beta.

    The update z <- y - rho*T(y) is the theorem's y - 2*lambda*beta*T(y), so lambda = rho / (2 beta), and
    convergence needs 0 <= alpha < 1, lambda > 0 and lambda*(1 - alpha + 2 alpha^2) < (1 - alpha)^2.
    beta is T's cocoercivity constant: exactly 1 when E is the left-inverse of D (then T(z) = z - z*);
    for a real VAE it is an assumption (the paper measures it per model). alpha = 0 gives rho < 2 beta,
    Theorem 1's forward-step condition.
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"inertial KM needs 0 <= alpha < 1 (Theorem 2), got alpha={alpha}")
    if beta <= 0:
        raise ValueError(f"cocoercivity beta must be > 0, got beta={beta}")
    if not rho > 0:
        raise ValueError(f"inertial KM needs rho > 0, got rho={rho}")
    limit = inertial_km_max_rho(alpha, beta)
    if not rho < limit:
        lam = rho / (2 * beta)
        raise ValueError(
            f"alpha={alpha}, rho={rho} violate Theorem 2 for beta={beta}: lambda = rho/(2 beta) = {lam:.4g} "
            f"must satisfy lambda*(1 - alpha + 2 alpha^2) < (1 - alpha)^2, i.e. rho < {limit:.4g}")


def _check_options(max_iterations, tolerance, patience, **steps):
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an integer >= 0, got {max_iterations!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (RMS per element of the residual), got {tolerance!r}")
    if patience is not None and not patience >= 1:
        raise ValueError(f"patience must be >= 1 evaluations (or None), got {patience!r}")
    for name, value in steps.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


class _Track:
    """Per-sample bookkeeping on the iterate's device: best iterate, stop masks, callback report.

    State tensors are replaced (index_copy), never written in place, so what a callback keeps stays valid.
    """

    def __init__(self, z0, tolerance, patience, max_iterations, callback, model_calls):
        b, device = z0.shape[0], z0.device
        self.last = self.best = z0
        self.residual = self.best_residual = torch.full((b,), math.inf, dtype=z0.dtype, device=device)
        self.iterations = self.best_iteration = self.since_best = torch.zeros(b, dtype=torch.long, device=device)
        self.converged = torch.zeros(b, dtype=torch.bool, device=device)
        self.active = ~self.converged
        self.tolerance, self.patience, self.max_iterations = tolerance, patience, max_iterations
        self.callback, self.model_calls, self.model_calls_backward = callback, model_calls, 0

    def rows(self):
        """Indices of the samples still iterating (nonzero: the iteration's one host sync)."""
        return self.active.nonzero().squeeze(1)

    def score(self, i, idx, candidate, residual, model_calls):
        """Score `candidate` (rows idx of the batch, i updates applied) by its residual; report."""
        self.model_calls += model_calls
        rms = per_sample_rms(residual)
        better = rms < self.best_residual[idx]
        since = torch.where(better, 0, self.since_best[idx] + 1)
        converged = rms <= self.tolerance
        stop = converged | (i >= self.max_iterations)
        if self.patience is not None:
            stop |= since >= self.patience
        for name, rows in (("last", candidate), ("best", select(better, candidate, self.best[idx])),
                           ("residual", rms), ("best_residual", torch.where(better, rms, self.best_residual[idx])),
                           ("iterations", torch.full_like(idx, i)),
                           ("best_iteration", torch.where(better, i, self.best_iteration[idx])),
                           ("since_best", since), ("converged", converged), ("active", ~stop)):
            setattr(self, name, getattr(self, name).index_copy(0, idx, rows))
        report(self.callback, i=i, x=self.last, residual=self.residual, best_residual=self.best_residual,
               iterations=self.iterations, best_iteration=self.best_iteration, hit_cap=~self.converged,
               active=self.active, model_calls=self.model_calls, model_calls_backward=self.model_calls_backward)


def _start(encode, x, dtype):
    """(x and E(x) in the work dtype, the model's dtype): the model runs in `dtype`, default x's."""
    dtype = x.dtype if dtype is None else dtype
    wd = work_dtype(x)
    return x.to(wd), encode(x.to(dtype)).to(wd), dtype


def _t(encode, decode, z, e_x, dtype):
    """T(z) = E(D(z)) - E(x) in z's dtype, the model run in `dtype`."""
    return encode(decode(z.to(dtype))).to(z.dtype) - e_x


def _adam_step(z, g, m, v, t, lr, eps, betas=(0.9, 0.999)):
    """One Adam update (Kingma & Ba 2015, bias-corrected) of z along the direction g; t counts from 1."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return z - lr * m_hat / (v_hat.sqrt() + eps), m, v


def invert_encoder(encode, decode, x, callback=None, disable=None, *, tolerance=TOLERANCE, residual=True,
                   dtype=None):
    """Baseline z = E(x) (the encoder's mean/mode, no sampling); with `residual`, also reports
    T(E(x)) (2 more model calls), `hit_cap` saying whether it is above `tolerance`."""
    _check_options(0, tolerance, None)
    with torch.no_grad():
        _, e_x, dtype = _start(encode, x, dtype)
        if residual:
            track = _Track(e_x, tolerance, None, 0, callback, model_calls=1)
            idx = torch.arange(e_x.shape[0], device=e_x.device)
            track.score(0, idx, e_x, _t(encode, decode, e_x, e_x, dtype), 2)
        return e_x


def invert_forward_step(encode, decode, x, callback=None, disable=None, *, max_iterations=MAX_ITERATIONS,
                        rho=DEFAULT_STEP["forward_step"], tolerance=TOLERANCE, patience=None, dtype=None):
    """Forward step z <- z - rho*T(z), T(z) = E(D(z)) - E(x), from z0 = E(x) (Theorem 1: 0 < rho < 2 beta).

    Up to `max_iterations` updates; the residual is evaluated max_iterations + 1 times (the last
    scores the final iterate), 2 model calls each, plus 1 for E(x).
    """
    _check_options(max_iterations, tolerance, patience, rho=rho)
    with torch.no_grad():
        _, e_x, dtype = _start(encode, x, dtype)
        z = e_x
        track = _Track(z, tolerance, patience, max_iterations, callback, model_calls=1)
        for i in range(max_iterations + 1):
            idx = track.rows()
            if idx.numel() == 0:
                break
            za = z[idx]
            r = _t(encode, decode, za, e_x[idx], dtype)
            track.score(i, idx, za, r, 2)
            if i == max_iterations:
                break
            z = z.index_copy(0, idx, za - rho * r)     # rows that just stopped are never evaluated again
        return track.best


def invert_momentum(encode, decode, x, callback=None, disable=None, *, max_iterations=MAX_ITERATIONS,
                    alpha=MOMENTUM, rho=DEFAULT_STEP["momentum"], beta=COCOERCIVITY, tolerance=TOLERANCE,
                    patience=None, dtype=None):
    """Inertial Krasnoselskii-Mann iteration, Theorem 2 of Hong et al. (2024), from z0 = z_-1 = E(x):
    y = z + alpha*(z - z_prev); z <- y - rho*T(y).

    (alpha, rho) are checked against Theorem 2 with cocoercivity `beta` (`check_inertial_km`): the
    defaults 0.3 / 0.5 need beta > 0.45 (limit rho < 1.11 beta), a 2x margin for beta = 1.
    The residual is evaluated at y, so y is what is scored, reported and returned.
    """
    check_inertial_km(alpha, rho, beta)
    _check_options(max_iterations, tolerance, patience)
    with torch.no_grad():
        _, e_x, dtype = _start(encode, x, dtype)
        z = z_prev = e_x
        track = _Track(z, tolerance, patience, max_iterations, callback, model_calls=1)
        for i in range(max_iterations + 1):
            idx = track.rows()
            if idx.numel() == 0:
                break
            za = z[idx]
            y = za + alpha * (za - z_prev[idx])                              # inertia
            r = _t(encode, decode, y, e_x[idx], dtype)
            track.score(i, idx, y, r, 2)
            if i == max_iterations:
                break
            z_prev, z = z_prev.index_copy(0, idx, za), z.index_copy(0, idx, y - rho * r)
        return track.best


def invert_adam_residual(encode, decode, x, callback=None, disable=None, *, max_iterations=ADAM_MAX_ITERATIONS,
                         lr=DEFAULT_STEP["adam_residual"], eps=ADAM_EPS, tolerance=TOLERANCE, patience=None,
                         dtype=None):
    """The authors' released gradient-free update: Adam (0.9, 0.999) with the residual T(z) as its
    gradient, lr schedule `authors_lr` (warm-up C//10, cosine to 0.8 C, then held; C = min(max_iterations, 100)).
    Moments in the work dtype (float32), so eps 1e-8 holds even when the model runs in 16 bit."""
    _check_options(max_iterations, tolerance, patience, lr=lr, eps=eps)
    with torch.no_grad():
        _, e_x, dtype = _start(encode, x, dtype)
        z, m, v = e_x, torch.zeros_like(e_x), torch.zeros_like(e_x)
        track = _Track(z, tolerance, patience, max_iterations, callback, model_calls=1)
        for i in range(max_iterations + 1):
            idx = track.rows()
            if idx.numel() == 0:
                break
            za = z[idx]
            r = _t(encode, decode, za, e_x[idx], dtype)
            track.score(i, idx, za, r, 2)
            if i == max_iterations:
                break
            step = _adam_step(za, r, m[idx], v[idx], i + 1, authors_lr(i, max_iterations, lr), eps)
            z, m, v = (t.index_copy(0, idx, s) for t, s in zip((z, m, v), step))
        return track.best


def invert_gradient(encode, decode, x, callback=None, disable=None, *, max_iterations=ADAM_MAX_ITERATIONS,
                    lr=DEFAULT_STEP["gradient"], warmup=None, eps=ADAM_EPS, tolerance=GRADIENT_TOLERANCE,
                    patience=None, dtype=None):
    """Gradient-based baseline: Adam on ||D(z) - x||^2 (summed per sample) from z0 = E(x), linear
    warm-up over `warmup` (default max_iterations//10) then cosine decay to 0. Residual here = RMS of
    D(z) - x per sample (pixel units), so `tolerance` is in pixel units (default 0: run every iteration).

    Autograd runs on fresh tensors under inference_mode(False) + enable_grad and takes the gradient
    w.r.t. z only (torch.autograd.grad): model weights get no .grad and keep their requires_grad.
    Each evaluation is one decode (`model_calls`) and, when an update follows, one backward through D
    (`model_calls_backward`).
    """
    warmup = max(1, max_iterations // 10) if warmup is None else warmup
    _check_options(max_iterations, tolerance, patience, lr=lr, eps=eps, warmup=warmup)
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            x, z, dtype = _start(encode, x.clone(), dtype)   # clones outside inference mode are normal tensors
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        track = _Track(z, tolerance, patience, max_iterations, callback, model_calls=1)
        for i in range(max_iterations + 1):
            idx = track.rows()
            if idx.numel() == 0:
                break
            za = z[idx].requires_grad_(True)
            err = decode(za.to(dtype)).to(za.dtype) - x[idx]                  # D(z) - x
            track.score(i, idx, za.detach(), err.detach(), 1)
            if i == max_iterations:
                break
            (g,) = torch.autograd.grad(err.pow(2).sum(), za)
            track.model_calls_backward += 1
            with torch.no_grad():
                step = _adam_step(za.detach(), g, m[idx], v[idx], i + 1,
                                  cosine_warmup_lr(i, max_iterations, lr, warmup), eps)
                z, m, v = (t.index_copy(0, idx, s) for t, s in zip((z, m, v), step))
        return track.best


METHODS = {
    "encoder": invert_encoder,
    "gradient": invert_gradient,
    "forward_step": invert_forward_step,
    "momentum": invert_momentum,
    "adam_residual": invert_adam_residual,
}
