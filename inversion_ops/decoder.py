"""Decoder inversion: find z with D(z) = x, given an encoder E and a decoder D (Hong et al., NeurIPS 2024).

Every method has the shape `invert_x(encode, decode, x, iters=..., tol=..., dtype=..., callback=None, **knobs)`
and returns `(z, info)`:
- `encode(x) -> z` and `decode(z) -> x` are plain callables on batches (B, ...); they are called with
  tensors of `dtype`, and their outputs are cast to `dtype`, so the latent being updated stays in it.
- The gradient-free methods iterate on the residual T(z) = E(D(z)) - E(x) from z0 = E(x) under
  `torch.no_grad()`; only `invert_gradient` uses autograd (and leaves the weights' `.grad` alone).
- Stopping is per sample: a sample stops when the RMS of its residual (per element, so the tolerance
  does not change meaning with resolution) is <= `tol`, or after `patience` evaluations without a new
  best; a stopped sample keeps its value and is no longer sent through the model.
- None of these iterations is monotone, so each sample's lowest-residual iterate is kept and returned;
  the last evaluated iterate is in `info.z_last`.
- `callback(dict(i, residual, z, active))` runs after every evaluation (residual: (B,) RMS per sample,
  z: the current iterate of the whole batch, active: (B,) bool); raise in it to interrupt.
"""
import math
from dataclasses import dataclass, field

import torch

from .common import InversionInfo, per_sample_rms


@dataclass
class DecoderInversionInfo(InversionInfo):
    """`InversionInfo` for one inversion "step": `residuals[k]` holds each sample's residual RMS at
    evaluation k (frozen samples repeat their last value), `iterations == [max over the batch]`,
    `hit_cap == [per-sample bools]`; the per-sample fields below say the rest."""
    sample_iterations: list = field(default_factory=list)  # updates applied to each sample
    best_iteration: list = field(default_factory=list)     # evaluation index of the returned iterate
    best_residual: list = field(default_factory=list)      # its residual RMS
    converged: list = field(default_factory=list)          # True where residual RMS <= tol was reached
    z_last: torch.Tensor = None                            # last evaluated iterate of each sample


class _PerSample:
    """Per-sample bookkeeping shared by the iterative methods: best iterate, stop masks, history, callback."""

    def __init__(self, z, tol, patience, callback, calls):
        b = z.shape[0]
        self.active = torch.arange(b, device=z.device)
        self.best, self.last = z.clone(), z.clone()
        self.now = torch.full((b,), float("inf"))
        self.best_rms = torch.full((b,), float("inf"))
        self.best_i = torch.zeros(b, dtype=torch.long)
        self.since_best = torch.zeros(b, dtype=torch.long)
        self.iters = torch.zeros(b, dtype=torch.long)
        self.converged = torch.zeros(b, dtype=torch.bool)
        self.tol, self.patience, self.callback = tol, patience, callback
        self.info = DecoderInversionInfo(model_calls=calls)

    def record(self, i, candidate, residual, idx):
        """Score `candidate` (rows `idx` of the batch, i updates done) by its residual; return the keep mask over idx."""
        rms = per_sample_rms(residual).cpu()
        j = idx.cpu()
        self.now[j] = rms
        self.iters[j] = i
        self.last[idx] = candidate
        better = rms < self.best_rms[j]
        self.best_rms[j] = torch.where(better, rms, self.best_rms[j])
        self.best_i[j] = torch.where(better, torch.full_like(j, i), self.best_i[j])
        self.since_best[j] = torch.where(better, torch.zeros_like(j), self.since_best[j] + 1)
        self.best[idx[better.to(idx.device)]] = candidate[better.to(candidate.device)]
        done = rms <= self.tol
        self.converged[j] |= done
        if self.patience is not None:
            done |= self.since_best[j] >= self.patience
        keep = ~done
        self.active = idx[keep.to(idx.device)]
        self.info.residuals.append(self.now.tolist())
        if self.callback is not None:
            active = torch.zeros_like(self.converged)
            active[self.active.cpu()] = True
            self.callback(dict(i=i, residual=self.now.clone(), z=self.last, active=active))
        return keep.to(idx.device)

    def finish(self):
        info = self.info
        info.sample_iterations = self.iters.tolist()
        info.iterations = [int(self.iters.max())]
        info.hit_cap = [(~self.converged).tolist()]
        info.best_iteration = self.best_i.tolist()
        info.best_residual = self.best_rms.tolist()
        info.converged = self.converged.tolist()
        info.z_last = self.last
        return self.best, info


def _adam_step(z, g, m, v, t, lr, eps, betas=(0.9, 0.999)):
    """One Adam update (Kingma & Ba 2015, bias-corrected) of z along the direction g; t counts from 1."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return z - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _adam_eps(dtype):
    """1e-8 underflows in 16 bit (fp16: v_hat.sqrt() + 1e-8 == v_hat.sqrt()); 1e-4 there, as the authors use."""
    return 1e-8 if dtype == torch.float32 or dtype == torch.float64 else 1e-4


def cosine_warmup_lr(i, iters, lr, warmup):
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 at `iters`."""
    if i < warmup:
        return lr * (i + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup)))


def authors_lr(i, iters, lr):
    """The schedule of the authors' released gradient-free Adam: C = min(iters, 100), warm-up C//10,
    cosine over C but held at its value from iteration ceil(0.8 C) - 1 on (about 0.13 lr for C = 100)."""
    c = min(iters, 100)
    return cosine_warmup_lr(min(i, math.ceil(0.8 * c) - 1), c, lr, c // 10)


def inertial_km_max_rho(alpha, beta=1.0):
    """Largest step rho = 2*lambda*beta that Theorem 2 allows: lambda < (1 - alpha)^2 / (1 - alpha + 2 alpha^2)."""
    return 2 * beta * (1 - alpha) ** 2 / (1 - alpha + 2 * alpha ** 2)


def check_inertial_km(alpha, rho, beta=1.0):
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


def _prepare(encode, x, dtype):
    x = x.to(dtype)
    return x, encode(x).to(dtype)


def invert_encoder(encode, decode, x, dtype=torch.float32, callback=None, residual=True):
    """Baseline z = E(x) (the encoder's mean/mode, no sampling); with `residual`, also records T(E(x))."""
    with torch.no_grad():
        x, e_x = _prepare(encode, x, dtype)
        track = _PerSample(e_x, 0.0, None, callback, calls=1)
        if residual:
            track.info.model_calls += 2
            track.record(0, e_x, encode(decode(e_x)).to(dtype) - e_x, track.active)
        return track.finish()


def invert_forward_step(encode, decode, x, iters=50, rho=0.5, tol=1e-4, patience=None,
                        dtype=torch.float32, callback=None):
    """Forward step z <- z - rho*T(z), T(z) = E(D(z)) - E(x), from z0 = E(x) (Theorem 1: 0 < rho < 2 beta).

    `iters` updates; the residual is evaluated iters + 1 times (the last one scores the final iterate),
    2 model calls each, plus 1 for E(x).
    """
    if not rho > 0:
        raise ValueError(f"forward step needs rho > 0, got rho={rho}")
    with torch.no_grad():
        x, e_x = _prepare(encode, x, dtype)
        z = e_x.clone()
        track = _PerSample(z, tol, patience, callback, calls=1)
        for i in range(iters + 1):
            a = track.active
            r = encode(decode(z[a])).to(dtype) - e_x[a]                     # T(z)
            track.info.model_calls += 2
            keep = track.record(i, z[a], r, a)
            if i == iters or not keep.any():
                break
            a, r = a[keep], r[keep]
            z[a] = z[a] - rho * r
        return track.finish()


def invert_momentum(encode, decode, x, iters=50, alpha=0.3, rho=0.5, beta=1.0, tol=1e-4, patience=None,
                    dtype=torch.float32, callback=None):
    """Inertial Krasnoselskii-Mann iteration, Theorem 2 of Hong et al. (2024), from z0 = z_-1 = E(x):
    y = z + alpha*(z - z_prev); z <- y - rho*T(y).

    (alpha, rho) are checked against Theorem 2 with cocoercivity `beta` (`check_inertial_km`): the
    defaults 0.3 / 0.5 need beta > 0.45 (limit rho < 1.11 beta), a 2x margin for beta = 1.
    The residual is evaluated at y, so y is what is scored, kept and returned.
    """
    check_inertial_km(alpha, rho, beta)
    with torch.no_grad():
        x, e_x = _prepare(encode, x, dtype)
        z = e_x.clone()
        z_prev = e_x.clone()
        track = _PerSample(z, tol, patience, callback, calls=1)
        for i in range(iters + 1):
            a = track.active
            y = z[a] + alpha * (z[a] - z_prev[a])                            # inertia
            r = encode(decode(y)).to(dtype) - e_x[a]                         # T(y)
            track.info.model_calls += 2
            keep = track.record(i, y, r, a)
            if i == iters or not keep.any():
                break
            a, y, r = a[keep], y[keep], r[keep]
            z_prev[a] = z[a]
            z[a] = y - rho * r
        return track.finish()


def invert_adam_residual(encode, decode, x, iters=100, lr=0.01, eps=None, tol=1e-4, patience=None,
                         dtype=torch.float32, callback=None):
    """The authors' released gradient-free update: Adam (0.9, 0.999) with the residual T(z) as its
    gradient, lr schedule `authors_lr` (warm-up C//10, cosine to 0.8 C, then held; C = min(iters, 100)),
    eps 1e-8 in fp32 and 1e-4 in 16 bit unless given. Moments are kept in `dtype`, as theirs are."""
    eps = _adam_eps(dtype) if eps is None else eps
    with torch.no_grad():
        x, e_x = _prepare(encode, x, dtype)
        z = e_x.clone()
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        track = _PerSample(z, tol, patience, callback, calls=1)
        for i in range(iters + 1):
            a = track.active
            r = encode(decode(z[a])).to(dtype) - e_x[a]                     # T(z)
            track.info.model_calls += 2
            keep = track.record(i, z[a], r, a)
            if i == iters or not keep.any():
                break
            a, r = a[keep], r[keep]
            z[a], m[a], v[a] = _adam_step(z[a], r, m[a], v[a], i + 1, authors_lr(i, iters, lr), eps)
        return track.finish()


def invert_gradient(encode, decode, x, iters=100, lr=0.01, warmup=None, eps=None, tol=0.0, patience=None,
                    dtype=torch.float32, callback=None):
    """Gradient-based baseline: Adam on ||D(z) - x||^2 (summed per sample) from z0 = E(x), linear warm-up
    over `warmup` (default iters//10) then cosine decay to 0. Residual here = RMS of D(z) - x per sample
    (pixel units), so `tol` is in pixel units (default 0: run all iterations).

    Autograd runs on cloned tensors under inference_mode(False) + enable_grad, and takes the gradient
    w.r.t. z only (torch.autograd.grad), so model weights get no .grad and keep their requires_grad.
    model_calls counts forward passes; each iteration also does one backward through D.
    """
    warmup = max(1, iters // 10) if warmup is None else warmup
    eps = _adam_eps(dtype) if eps is None else eps
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone().to(dtype)
        with torch.no_grad():
            z = encode(x).to(dtype).clone()
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        track = _PerSample(z, tol, patience, callback, calls=1)
        for i in range(iters + 1):
            a = track.active
            za = z[a].detach().requires_grad_(True)
            err = decode(za).to(dtype).float() - x[a].float()               # D(z) - x, summed in fp32
            (g,) = torch.autograd.grad(err.pow(2).sum(), za)
            track.info.model_calls += 1
            keep = track.record(i, za.detach(), err.detach(), a)
            if i == iters or not keep.any():
                break
            a, g = a[keep], g[keep]
            with torch.no_grad():
                z[a], m[a], v[a] = _adam_step(z[a], g, m[a], v[a], i + 1, cosine_warmup_lr(i, iters, lr, warmup), eps)
        z_best, info = track.finish()
        return z_best.detach(), info


METHODS = {
    "encoder": invert_encoder,
    "gradient": invert_gradient,
    "forward_step": invert_forward_step,
    "momentum": invert_momentum,
    "adam_residual": invert_adam_residual,
}
