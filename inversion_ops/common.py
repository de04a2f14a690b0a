"""Helpers shared by every inversion function, in k-diffusion's conventions: `model(x, sigma_batch, **extra_args)
-> denoised`; iterates float32 (float64 stays); tolerances are RMS per element; diagnostics in the callback dict."""
import torch

SIGMA_FLOOR = 1e-4   # what ComfyUI's FlipSigmas puts in place of a leading 0
# below what a model in this dtype lets a step reach, a solve runs to its cap: see docs/results.md#tolerance-floor
TOLERANCE_FLOOR = {torch.float16: 3e-4, torch.bfloat16: 2e-3}


def reachable_tolerance(tolerance, model_dtype):
    """`tolerance`, raised to what a model computing in `model_dtype` can reach."""
    return max(float(tolerance), TOLERANCE_FLOOR.get(model_dtype, 0.0))


def bf16_is_native(device):
    """Whether `device` runs bfloat16 convolutions natively: CUDA from compute capability 8, a CPU whose oneDNN
    has bf16 kernels (AVX512-BF16 or AMX). Elsewhere (MPS, older GPUs and CPUs) bf16 is emulated or missing."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def work_dtype(x):
    """The dtype iterates accumulate in: float32, or float64 when x already is."""
    return torch.promote_types(x.dtype, torch.float32)


def append_dims(v, x):
    """Broadcast a (B,) vector (or a scalar tensor) over the trailing dims of x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def sigma_batch(sigma, x):
    """sigma (a number or a 0-d / 1-element tensor) as the (B,) tensor a model takes, on x's device."""
    return x.new_ones([x.shape[0]]) * sigma


def to_d(x, sigma, denoised):
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (k-diffusion's `to_d`, same order)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / append_dims(sigma, x) if sigma.ndim else (x - denoised) / sigma


def euler_step(x, denoised, sigma, sigma_next):
    """One DDIM / Euler step with ComfyUI's `sample_euler` arithmetic (x + d * dt), either direction, any D."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def naive_step(model, x, sigma, sigma_next, extra_args):
    """Naive inversion step sigma -> sigma_next (noisier), D taken at x labelled sigma_next (DDIM inversion)."""
    denoised = model(x, sigma_batch(sigma_next, x), **extra_args).to(x.dtype)
    return x + to_d(x, sigma_next, denoised) * (sigma_next - sigma)


def check_sigmas(sigmas, ascending=True, unit_interval=False):
    """Validate a schedule (ascending for inversions, descending noise -> image); returns it 1-D."""
    if not torch.is_tensor(sigmas):
        sigmas = torch.tensor(sigmas, dtype=torch.float64)   # cpu: a list has no device; callers move it
    sigmas = sigmas.flatten()
    values = sigmas.detach().cpu().double()
    steps = values[1:] - values[:-1]
    ordered = bool((steps > 0).all()) if ascending else bool((steps < 0).all())
    in_range = not unit_interval or bool(((values >= 0) & (values <= 1)).all())
    if len(values) < 2 or not ordered or not in_range or bool((values < 0).any()):
        order = "strictly ascending (least noisy first, e.g. Inversion Sigmas or FlipSigmas)" if ascending \
            else "strictly descending (noisiest first, e.g. BasicScheduler)"
        where = " within [0, 1]" if unit_interval else ""
        raise ValueError(f"sigmas must be {order}{where} with at least 2 entries, got {values.tolist()}")
    return sigmas


def per_sample_rms(t):
    """Root-mean-square over every dim but the batch, in float32 (float64 stays): shape (B,)."""
    return t.detach().to(work_dtype(t)).flatten(1).pow(2).mean(1).sqrt()


def select(mask, new, old):
    """Per-sample choice: rows of `new` where the (B,) mask is True, else rows of `old`."""
    return torch.where(append_dims(mask, new), new, old)


class CountedModel:
    """`model` with its calls counted; other attributes are the model's (samplers read `inner_model`)."""

    def __init__(self, model, extra_args=None):
        self.model, self.extra_args, self.calls = model, extra_args or {}, 0

    def __getattr__(self, name):
        if name == "model":   # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x, sigma, **extra_args):
        self.calls += 1
        return self.model(x, sigma_batch(sigma, x), **{**self.extra_args, **extra_args})


def report(callback, **fields):
    """Call a k-diffusion callback, if any; `denoised` falls back to x where a step has none."""
    if callback is not None:
        if fields.get("denoised") is None:
            fields["denoised"] = fields["x"]
        fields.setdefault("sigma_hat", fields.get("sigma"))
        callback(fields)


class StepLog:
    """A callback keeping every reported field but the latents, one record per callback, and the last
    model-call counts; `tee` chains it before ComfyUI's own callback."""

    SKIP = ("x", "denoised", "sigma", "sigma_hat", "previous")

    def __init__(self):
        self._raw, self._records = [], []
        self.model_calls, self.model_calls_backward = 0, 0

    def __call__(self, d):
        # tensors stay on their device (a clone, no host sync) until the records are read
        self._raw.append({key: value.detach().clone() if torch.is_tensor(value) else value
                          for key, value in d.items() if key not in self.SKIP and value is not None})
        self.model_calls = d.get("model_calls", self.model_calls)
        self.model_calls_backward = d.get("model_calls_backward", self.model_calls_backward)

    @property
    def records(self):
        """One dict per callback, tensors as lists (one host copy each, after the run)."""
        for raw in self._raw[len(self._records):]:
            self._records.append({"pass": 0, **{k: v.cpu().tolist() if torch.is_tensor(v) else v
                                                for k, v in raw.items()}})
        return self._records

    @classmethod
    def join(cls, logs):
        """Logs of runs over consecutive parts of a batch as one (a shorter run repeats its last record)."""
        joined, logs = cls(), [log for log in logs if log.records]
        for k in range(max((len(log.records) for log in logs), default=0)):
            record = {}
            for log in logs:
                for key, value in log.records[min(k, len(log.records) - 1)].items():
                    if isinstance(value, list):
                        record.setdefault(key, []).extend(value)
                    else:
                        record.setdefault(key, value)
            joined._records.append(record)
        joined.model_calls = sum(log.model_calls for log in logs)
        joined.model_calls_backward = sum(log.model_calls_backward for log in logs)
        return joined

    def series(self, key, last_pass=False):
        """Per-record lists of per-sample values of `key`; last_pass: only the final pass's records."""
        records = self.records
        if last_pass and records:
            records = [r for r in records if r.get("pass") == records[-1].get("pass")]
        return [r[key] for r in records if key in r]

    @property
    def residuals(self):
        return self.series("residual")

    @property
    def hit_cap(self):
        return self.series("hit_cap")

    @property
    def iterations(self):
        return self.series("iterations")

    def observe(self, function):
        """`function` (an inversion function) with every callback dict also recorded here."""
        def observed(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
            return function(model, x, sigmas, extra_args, self.tee(callback), disable, **options)
        return observed

    def tee(self, callback=None):
        """A callback that records here, then calls `callback` (e.g. ComfyUI's preview / progress)."""
        def both(d):
            self(d)
            if callback is not None:
                callback(d)
        return both
