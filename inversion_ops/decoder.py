"""Decoder inversion (Hong et al., NeurIPS 2024): find z with D(z) = x. Each method is `invert_<name>(encode,
decode, x, callback=None, disable=None, **options) -> z`, rows independent, the model run in `dtype`, the
iterate float32; each sample stops on its own and returns its lowest-residual iterate.
"""
import math
import numbers

import torch

from .common import bf16_is_native, per_sample_rms, report, work_dtype
from .solvers import SampleTracker, adam_step

# Defaults and policy, read by the node.
METHOD_NAMES = ("hybrid", "forward_step", "momentum", "adam_residual", "gradient", "encoder")   # the node's order
METHOD = "hybrid"            # beats the gradient baseline on real photos: see docs/results.md#decoder-on-taef2
MAX_ITERATIONS = 25          # updates per sample (forward_step, momentum, hybrid and the node)
FIXED_POINT_ITERATIONS = 5   # hybrid: forward steps before the pixel finish; E(D(z)) = E(x) is reached by then
ADAM_MAX_ITERATIONS = 100    # adam_residual / gradient called directly: the authors' schedule spans 100
TOLERANCE = 1e-4             # RMS per element of E(D(z)) - E(x), raw latent units
GRADIENT_TOLERANCE = 0.0     # the gradient method's residual D(z) - x is in pixel units: run every iteration
DEFAULT_STEP = {"forward_step": 0.5, "momentum": 0.5, "adam_residual": 0.01, "gradient": 0.01, "hybrid": 0.03}
STEP_OPTION = {"forward_step": "rho", "momentum": "rho", "adam_residual": "lr", "gradient": "lr", "hybrid": "lr"}
AUTO_STEP_MARGIN = 0.5       # auto momentum step: at most this fraction of Theorem 2's bound
MOMENTUM = 0.3               # inertia alpha, inside Theorem 2 with rho 0.5: see docs/results.md#momentum
COCOERCIVITY = 1.0           # beta: exact when E is D's left-inverse, an assumption for a real VAE
ADAM_EPS = 1e-8              # Adam's moments are float32, so 1e-8 does not underflow
AUTO_DTYPE = torch.float32   # precision "auto": a 16-bit VAE's rounding sets the floor; see docs/results.md#auto-dtype
FINISH_DTYPE = torch.bfloat16   # hybrid's finish under "auto" where bf16 runs natively: see docs/results.md#decoder-on-taef2


def cosine_warmup_lr(i, max_iterations, lr, warmup):
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 at `max_iterations`."""
    if i < warmup:
        return lr * (i + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, max_iterations - warmup)))


def authors_lr(i, max_iterations, lr):
    """The authors' released schedule: C = min(max_iterations, 100), warm-up C//10, cosine held from 0.8 C."""
    c = min(max_iterations, 100)
    return cosine_warmup_lr(min(i, math.ceil(0.8 * c) - 1), c, lr, c // 10)


def inertial_km_max_rho(alpha, beta=COCOERCIVITY):
    """Largest rho = 2*lambda*beta that Theorem 2 allows: lambda < (1 - alpha)^2 / (1 - alpha + 2 alpha^2)."""
    return 2 * beta * (1 - alpha) ** 2 / (1 - alpha + 2 * alpha ** 2)


def auto_momentum_step(alpha, beta=COCOERCIVITY):
    """The momentum method's step for step_size 0: the default, shrunk to AUTO_STEP_MARGIN of Theorem 2's
    bound where alpha makes that bound smaller, so every alpha in [0, 1) runs."""
    return min(DEFAULT_STEP["momentum"], AUTO_STEP_MARGIN * inertial_km_max_rho(alpha, beta))


def check_inertial_km(alpha, rho, beta=COCOERCIVITY):
    """Raise ValueError unless (alpha, rho) satisfy Theorem 2 of Hong et al. (2024), lambda = rho / (2 beta),
    for T's cocoercivity beta (1 when E is D's left-inverse; for a real VAE an assumption)."""
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


def _start(encode, x, dtype):
    """(x and E(x) in the work dtype, the model's dtype): the model runs in `dtype`, default x's."""
    dtype = x.dtype if dtype is None else dtype
    wd = work_dtype(x)
    return x.to(wd), encode(x.to(dtype)).to(wd), dtype


def _fixed_point_residual(encode, decode, x, dtype):
    """(E(x), T) with T(z, rows) = E(D(z)) - E(x)[rows] in z's dtype, the model run in `dtype`."""
    _, e_x, dtype = _start(encode, x, dtype)
    return e_x, lambda z, rows: encode(decode(z.to(dtype))).to(z.dtype) - e_x[rows]


def _iterate(z0, state, evaluate, update, callback, tolerance, patience, max_iterations, calls=(2, 0)):
    """The loop every method shares: evaluate the active rows of `state` (z first), score and report them,
    apply the method's `update` to them. calls: (model calls per evaluation, backward passes per update)."""
    track = SampleTracker(z0)
    last, residual = z0, torch.full_like(track.best_residual, math.inf)
    best_iteration, model_calls, model_calls_backward = torch.zeros_like(track.iterations), 1, 0   # 1: E(x)
    for i in range(max_iterations + 1):
        rows = track.active.nonzero().squeeze(1)   # the iteration's one host sync
        if rows.numel() == 0:
            break
        state_rows = [s[rows] for s in state]
        candidate, r = evaluate(*state_rows, rows)
        model_calls += calls[0]
        last = last.index_copy(0, rows, candidate.detach())
        residual = residual.index_copy(0, rows, per_sample_rms(r))
        better = track.update(last, residual, track.active)
        best_iteration = torch.where(better, track.iterations, best_iteration)
        converged = track.best_residual <= tolerance
        stalled = track.stale >= patience if patience is not None else torch.zeros_like(converged)
        track.keep(~(converged | stalled | (i >= max_iterations)))
        report(callback, i=i, x=last, residual=residual, best_residual=track.best_residual,
               iterations=track.iterations, best_iteration=best_iteration, hit_cap=~converged, active=track.active,
               model_calls=model_calls, model_calls_backward=model_calls_backward)
        if i == max_iterations:
            break
        state = [s.index_copy(0, rows, new) for s, new in zip(state, update(i, state_rows, candidate, r))]
        model_calls_backward += calls[1]
    return track.best_x


def invert_encoder(encode, decode, x, callback=None, disable=None, *, tolerance=TOLERANCE, residual=True,
                   dtype=None):
    """Baseline z = E(x); with `residual`, also reports the residual T(E(x))."""
    _check_options(0, tolerance, None)
    with torch.no_grad():
        e_x, t = _fixed_point_residual(encode, decode, x, dtype)
        if residual:
            _iterate(e_x, [e_x], lambda z, rows: (z, t(z, rows)), None, callback, tolerance, None, 0)
        return e_x


def invert_forward_step(encode, decode, x, callback=None, disable=None, *, max_iterations=MAX_ITERATIONS,
                        rho=DEFAULT_STEP["forward_step"], tolerance=TOLERANCE, patience=None, dtype=None):
    """Forward step z <- z - rho*T(z), T(z) = E(D(z)) - E(x), from z0 = E(x) (Hong et al. 2024, Theorem 1)."""
    _check_options(max_iterations, tolerance, patience, rho=rho)
    with torch.no_grad():
        e_x, t = _fixed_point_residual(encode, decode, x, dtype)

        def evaluate(z, rows):
            return z, t(z, rows)

        def update(i, state, z, r):
            return [z - rho * r]
        return _iterate(e_x, [e_x], evaluate, update, callback, tolerance, patience, max_iterations)


def invert_momentum(encode, decode, x, callback=None, disable=None, *, max_iterations=MAX_ITERATIONS,
                    alpha=MOMENTUM, rho=DEFAULT_STEP["momentum"], beta=COCOERCIVITY, tolerance=TOLERANCE,
                    patience=None, dtype=None):
    """Inertial Krasnoselskii-Mann (Hong et al. 2024, Theorem 2) from z0 = z_-1 = E(x):
    y = z + alpha*(z - z_prev); z <- y - rho*T(y). y is what is scored and returned."""
    check_inertial_km(alpha, rho, beta)
    _check_options(max_iterations, tolerance, patience)
    with torch.no_grad():
        e_x, t = _fixed_point_residual(encode, decode, x, dtype)

        def evaluate(z, z_prev, rows):
            y = z + alpha * (z - z_prev)
            return y, t(y, rows)

        def update(i, state, y, r):
            return [y - rho * r, state[0]]
        return _iterate(e_x, [e_x, e_x], evaluate, update, callback, tolerance, patience, max_iterations)


def invert_adam_residual(encode, decode, x, callback=None, disable=None, *, max_iterations=ADAM_MAX_ITERATIONS,
                         lr=DEFAULT_STEP["adam_residual"], eps=ADAM_EPS, tolerance=TOLERANCE, patience=None,
                         dtype=None):
    """The authors' released gradient-free update: Adam with T(z) as its gradient, lr schedule `authors_lr`."""
    _check_options(max_iterations, tolerance, patience, lr=lr, eps=eps)
    with torch.no_grad():
        e_x, t = _fixed_point_residual(encode, decode, x, dtype)

        def evaluate(z, m, v, rows):
            return z, t(z, rows)

        def update(i, state, z, r):
            return adam_step(z, r, state[1], state[2], i + 1, authors_lr(i, max_iterations, lr), eps)
        zeros = torch.zeros_like(e_x)
        return _iterate(e_x, [e_x, zeros, zeros], evaluate, update, callback, tolerance, patience, max_iterations)


def invert_gradient(encode, decode, x, callback=None, disable=None, *, max_iterations=ADAM_MAX_ITERATIONS,
                    lr=DEFAULT_STEP["gradient"], warmup=None, eps=ADAM_EPS, tolerance=GRADIENT_TOLERANCE,
                    patience=None, dtype=None):
    """Gradient baseline: Adam on ||D(z) - x||^2 from z0 = E(x), `cosine_warmup_lr` (warm-up default
    max_iterations//10). The residual is D(z) - x, so `tolerance` is in pixel units. Gradients go to z only."""
    warmup = max(1, max_iterations // 10) if warmup is None else warmup
    _check_options(max_iterations, tolerance, patience, lr=lr, eps=eps, warmup=warmup)
    with torch.no_grad():
        _, z0, _ = _start(encode, x, dtype)
    return _pixel_adam(decode, x, z0, callback, max_iterations, lr, warmup, eps, tolerance, patience, dtype)


def hybrid_finish_dtype(dtype, device, auto):
    """The dtype hybrid's finish differentiates the decoder in: FINISH_DTYPE under precision auto where `device`
    runs it natively (half the activation memory), else the run's own dtype."""
    return FINISH_DTYPE if auto and bf16_is_native(device) else dtype


def invert_hybrid(encode, decode, x, callback=None, disable=None, *, max_iterations=MAX_ITERATIONS,
                  fixed_point_iterations=FIXED_POINT_ITERATIONS, rho=DEFAULT_STEP["forward_step"],
                  lr=DEFAULT_STEP["hybrid"], eps=ADAM_EPS, tolerance=GRADIENT_TOLERANCE, patience=None, dtype=None,
                  finish_decode=None, finish_dtype=None):
    """Forward steps to the encoder's fixed point E(D(z)) = E(x) (gradient-free, cheap), then Adam on
    ||D(z) - x||^2 for the remaining updates, cosine-decayed from `lr` without warm-up: the finish recovers
    what the encoder cannot see. `tolerance` (pixel units) applies to the finish. finish_decode / finish_dtype:
    the decoder the finish differentiates (a cheaper copy, e.g. `checkpointed` in bf16), default decode / dtype."""
    _check_options(max_iterations, tolerance, patience, rho=rho, lr=lr, eps=eps)
    first = min(fixed_point_iterations, max_iterations)
    offset = {"i": 0, "model_calls": 0, "model_calls_backward": 0}

    def counted_on(d):
        if callback is not None:
            callback({**d, **{k: d[k] + v for k, v in offset.items()}})
    z = invert_forward_step(encode, decode, x, counted_on, disable, max_iterations=first, rho=rho, tolerance=0.0,
                            dtype=dtype)
    if first == max_iterations:
        return z
    offset.update(i=first + 1, model_calls=2 * (first + 1))   # the finish's own count starts at E(x)'s 1
    return _pixel_adam(finish_decode or decode, x, z, counted_on, max_iterations - first, lr, 1, eps, tolerance,
                       patience, finish_dtype or dtype)


def _pixel_adam(decode, x, z0, callback, max_iterations, lr, warmup, eps, tolerance, patience, dtype):
    """Adam on ||D(z) - x||^2 from z0 with `cosine_warmup_lr`; gradients go to z only."""
    dtype = x.dtype if dtype is None else dtype
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            x, z0 = x.clone().to(work_dtype(x)), z0.clone()    # clones outside inference mode are normal tensors

        def evaluate(z, m, v, rows):
            z.requires_grad_(True)
            return z, decode(z.to(dtype)).to(z.dtype) - x[rows]

        def update(i, state, z, error):
            (g,) = torch.autograd.grad(error.pow(2).sum(), z)
            with torch.no_grad():
                return adam_step(z.detach(), g, state[1], state[2], i + 1,
                                 cosine_warmup_lr(i, max_iterations, lr, warmup), eps)
        zeros = torch.zeros_like(z0)
        return _iterate(z0, [z0, zeros, zeros], evaluate, update, callback, tolerance, patience, max_iterations,
                        calls=(1, 1))


class _Recomputed(torch.nn.Module):
    """Layers whose activations are recomputed in the backward pass instead of kept (torch.utils.checkpoint)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.layers(x)
        return torch.utils.checkpoint.checkpoint(self.layers, x, use_reentrant=False)


def checkpointed(module):
    """A copy of `module` whose nn.Sequential parts run as about sqrt(n) recomputed segments: a VJP through it
    keeps one segment's activations at a time, not the whole network's. Weights are shared with `module`,
    which is left as it came; a Sequential subclass keeps its own forward."""
    import copy
    import torch.utils.checkpoint   # noqa: F401  (torch.utils.checkpoint is a lazy submodule)
    out = copy.copy(module)
    layers = list(module._modules.values())
    if isinstance(module, torch.nn.Sequential) and len(layers) > 2:
        size = math.ceil(len(layers) / round(math.sqrt(len(layers))))
        out._modules = {str(k): _Recomputed(layers[i:i + size]) for k, i in enumerate(range(0, len(layers), size))}
    else:
        out._modules = {name: checkpointed(child) for name, child in module._modules.items()}
    return out


METHODS = {
    "encoder": invert_encoder,
    "hybrid": invert_hybrid,
    "gradient": invert_gradient,
    "forward_step": invert_forward_step,
    "momentum": invert_momentum,
    "adam_residual": invert_adam_residual,
}
