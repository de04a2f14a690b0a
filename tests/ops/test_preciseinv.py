"""PreciseInv on the closed-form Gaussian-mixture denoiser (EPS and flow), tiny tensors.

The converged eta = 1e-5 runs are shared between tests (`converged_run`); tests whose assertion
does not depend on convergence (no weight grads, unchanged input, exact equality under
inference mode, call counts) cap the iterations at SHORT_RUN to keep the file fast.
"""
import functools

import pytest
import torch

from inversion_ops.common import StepLog, euler_step
from inversion_ops.exact import naive_inversion
from inversion_ops.preciseinv import preciseinv
from tests.support.analytic import GaussianMixtureDenoiser
from tests.support.metrics import nmse_db

SHAPE = (2, 4, 4)
# ComfyUI-like schedules, ascending: SD1.5 "simple" at 2 steps; SD3-style shift-3 flow at 2 steps.
SIGMAS_T2 = {"eps": [0.0, 1.613, 14.615], "flow": [0.0, 0.75, 1.0]}


def mixture(parameterization, seed=0):
    return GaussianMixtureDenoiser.random(SHAPE, components=3, seed=seed, parameterization=parameterization,
                                          weights=[0.6, 0.3, 0.1])


def clean_latents(model, n=2, seed=1):
    return model.sample(n, torch.Generator().manual_seed(seed)).float()


def sample_euler(denoise, x, sigmas_descending):
    """ComfyUI's sample_euler arithmetic (x + d * dt), the last step landing on D(x, s)."""
    for s, s_next in zip(sigmas_descending[:-1], sigmas_descending[1:]):
        x = euler_step(x, denoise(x, torch.full((x.shape[0],), s)), s, s_next)
    return x


def reconstruction_db(model, x0, x_T, sigmas):
    return nmse_db(sample_euler(model, x_T, sigmas[::-1]), x0)


SHORT_RUN = 10   # enough gradient steps to exercise the optimiser (and its backward passes)


def run(model, x0, sigmas, eta=1e-5, **options):
    """PreciseInv with the paper's loss threshold eta (tolerance = sqrt(eta) on the residual RMS);
    returns (x_T, StepLog)."""
    log = StepLog()
    return preciseinv(model, x0, sigmas, callback=log, tolerance=eta ** 0.5, **options), log


@functools.lru_cache(maxsize=None)
def converged_run(parameterization, eta=1e-5):
    """PreciseInv of the default batch at T = 2, computed once per session; returns (x_T, StepLog)."""
    model = mixture(parameterization)
    return run(model, clean_latents(model), SIGMAS_T2[parameterization], eta=eta)


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_two_steps_reconstruct_at_least_10_db_better_than_naive(parameterization):
    # Naive inversion at 2 steps errs by O(step) (about -12 dB here); PreciseInv's per-step
    # residual is < 1e-5 per element, i.e. about -50 dB for unit-scale latents: 10 dB is a
    # conservative margin that still fails if the optimisation does nothing.
    model, sigmas = mixture(parameterization), SIGMAS_T2[parameterization]
    x0 = clean_latents(model)
    x_naive = naive_inversion(model, x0, torch.tensor(sigmas))
    x_pi, info = converged_run(parameterization)
    naive_db = reconstruction_db(model, x0, x_naive, sigmas)
    pi_db = reconstruction_db(model, x0, x_pi, sigmas)
    assert (pi_db <= naive_db - 10).all(), (naive_db, pi_db, info.residuals)


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_eta_1e_5_is_at_least_as_accurate_as_eta_1e_2(parameterization):
    # Both runs follow the same trajectory until the 1e-2 run stops; the later steps start from
    # slightly different targets, so allow 0.5 dB of noise (the expected gap is tens of dB).
    model, sigmas = mixture(parameterization), SIGMAS_T2[parameterization]
    x0 = clean_latents(model)
    coarse, _ = converged_run(parameterization, eta=1e-2)
    fine, _ = converged_run(parameterization)
    assert (reconstruction_db(model, x0, fine, sigmas)
            <= reconstruction_db(model, x0, coarse, sigmas) + 0.5).all()


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_batch_of_two_equals_two_single_runs(parameterization):
    # Samples are independent (per-sample step sizes, stop masks and best iterates); the only
    # difference is float32 rounding in batched arithmetic, amplified over the iterations:
    # 1e-4 absolute on unit-scale latents.
    model, sigmas = mixture(parameterization), SIGMAS_T2[parameterization]
    x0 = clean_latents(model)
    batch, info = converged_run(parameterization)
    singles = torch.cat([run(model, x0[i:i + 1], sigmas)[0] for i in range(2)])
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=0)
    assert len(info.residuals) == 2 and all(len(r) == 2 for r in info.residuals)


class ScaledMixture(torch.nn.Module):
    """A denoiser with parameters: the analytic model times a trainable 1 plus a frozen 0."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.offset = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x, sigma):
        return self.model(x, sigma) * self.scale + self.offset


def test_denoiser_parameters_get_no_grad_and_keep_requires_grad():
    net = ScaledMixture(mixture("eps"))
    x_T, _ = run(net, clean_latents(net.model), SIGMAS_T2["eps"], max_iterations=SHORT_RUN)
    assert net.scale.grad is None and net.offset.grad is None
    assert net.scale.requires_grad and not net.offset.requires_grad
    assert not x_T.requires_grad and x_T.grad_fn is None


def test_input_latent_is_unchanged():
    model = mixture("flow")
    x0 = clean_latents(model)
    before = x0.clone()
    run(model, x0, SIGMAS_T2["flow"], max_iterations=SHORT_RUN)
    assert torch.equal(x0, before) and not x0.requires_grad


def test_runs_under_inference_mode_with_inference_tensors():
    # ComfyUI samples under torch.inference_mode(); the result must match a normal call exactly
    # (same arithmetic, same order).
    net = ScaledMixture(mixture("eps"))
    x0 = clean_latents(net.model)
    reference, _ = run(net, x0, SIGMAS_T2["eps"], max_iterations=SHORT_RUN)
    with torch.inference_mode():
        x0_inf = x0.clone()
        sigmas_inf = torch.tensor(SIGMAS_T2["eps"], dtype=torch.float64)
        assert x0_inf.is_inference()
        x_T, _ = run(net, x0_inf, sigmas_inf, max_iterations=SHORT_RUN)
    assert torch.equal(x_T, reference)
    assert net.scale.grad is None


def test_counts_forward_and_backward_model_passes():
    model = mixture("eps")
    backward = []

    def counted(x, sigma):
        out = model(x, sigma)
        if out.requires_grad:
            out.register_hook(lambda g: backward.append(1))
        return out

    model.calls = 0
    _, info = run(counted, clean_latents(model), SIGMAS_T2["eps"], max_iterations=SHORT_RUN)
    assert info.model_calls == model.calls
    assert info.model_calls_backward == len(backward) > 0


@pytest.mark.parametrize("parameterization,sigmas", [
    ("eps", [0.0, 14.615]),
    ("eps", [0.0, 1.613, 14.615]),
    ("eps", [0.0, 0.693, 1.613, 4.082, 14.615]),
    ("flow", [0.0, 1.0]),
    ("flow", [0.0, 0.5, 0.75, 0.9, 1.0]),
])
def test_one_two_four_steps_and_flow_ending_at_sigma_one_are_finite(parameterization, sigmas):
    model = mixture(parameterization)
    x_T, info = run(model, clean_latents(model), sigmas, max_iterations=2 * SHORT_RUN)
    assert torch.isfinite(x_T).all()
    assert len(info.residuals) == len(info.iterations) == len(info.hit_cap) == len(sigmas) - 1
    assert all(torch.isfinite(torch.tensor(r)).all() for r in info.residuals)
