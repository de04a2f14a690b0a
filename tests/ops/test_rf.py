"""RF-Inversion on the closed-form flow Gaussian-mixture denoiser (exact model, tiny tensors)."""
import pytest
import torch

from inversion_ops.common import StepLog, to_d
from inversion_ops.rf import (controlled_forward, controlled_forward_sde, controlled_reverse, controlled_reverse_sde,
                              eta_schedule)
from tests.support.analytic import GaussianMixtureDenoiser

SHAPE = (4, 8, 8)
STEPS = 12


@pytest.fixture
def model():
    return GaussianMixtureDenoiser.random(shape=SHAPE, components=3, seed=0, parameterization="flow")


def up():
    return torch.linspace(0, 1, STEPS + 1)   # image -> noise, ends exactly at sigma = 1


def down():
    return torch.linspace(1, 0, STEPS + 1)   # noise -> image, starts exactly at sigma = 1


def image(model, n=1, seed=1):
    return model.sample(n, generator=torch.Generator().manual_seed(seed)).float()


def comfy_sample_euler(denoise, x, sigmas):
    """ComfyUI's sample_euler (s_churn = 0) written out: d = (x - D)/sigma; x = x + d*dt."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def run(function, model, x, sigmas, *reference, **options):
    """(result, StepLog) of an RF function; a positional reference goes to reference=."""
    log = StepLog()
    if reference:
        options["reference"] = reference[0]
    return function(model, x, sigmas, callback=log, **options), log


def plain_ode_inversion(denoise, x, sigmas, sigma_floor=1e-4):
    """Plain rectified-flow ODE inversion written out: Euler up, the model at 1e-4 where sigma = 0."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].clamp_min(sigma_floor)
        x = x + (x - denoise(x, sigma * s_in)) / sigma * (sigmas[i + 1] - sigmas[i])
    return x


def test_gamma_zero_equals_plain_inversion(model):
    # Same arithmetic on the same values: gamma = 0 adds exactly 0 to the plain Euler step.
    x0 = image(model, 2)
    plain = plain_ode_inversion(model, x0, up())
    controlled, info = run(controlled_forward, model, x0, up(), gamma=0.0, seed=3)
    assert torch.equal(controlled, plain)
    assert info.model_calls == STEPS and all(r == 0 for step in info.residuals for r in step)


def test_eta_zero_reverse_equals_comfyui_sample_euler(model):
    # eta = 0 leaves D untouched and uses euler_step: float32 rounding only, 1e-6 allows a few ulps.
    x1 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    out, _ = run(controlled_reverse, model, x1, down(), image(model, 2), eta=0.0, stop=1.0)
    assert (out - comfy_sample_euler(model, x1, down())).abs().max() < 1e-6


def test_reverse_controller_is_euler_with_blended_denoised(model):
    # v + eta*((X - y0)/sigma - v) == (X - D')/sigma with D' = (1 - eta) D + eta y0 (float64 algebra).
    x, y0, sigma, eta = torch.randn(1, *SHAPE, dtype=torch.float64), image(model).double(), 0.37, 0.6
    denoised = model(x, torch.tensor([sigma]))
    v = (x - denoised) / sigma
    explicit = v + eta * ((x - y0) / sigma - v)
    blended = to_d(x, sigma, (1 - eta) * denoised + eta * y0)
    assert torch.allclose(explicit, blended, rtol=0, atol=1e-12)


def test_gamma_one_maps_flat_latent_to_standard_noise(model):
    # gamma = 1 lands on y1 ~ N(0, I): 1024 elements give std error ~0.02 and mean error ~0.03.
    flat = torch.full((1, 4, 16, 16), 0.8)
    big = GaussianMixtureDenoiser.random(shape=(4, 16, 16), components=3, seed=0, parameterization="flow")
    noise, _ = run(controlled_forward, big, flat, up(), gamma=1.0, seed=7)
    assert abs(noise.std().item() - 1) < 0.1
    assert abs(noise.mean().item()) < 0.125   # 4 standard errors of the mean


def test_larger_eta_brings_output_closer_to_reference(model):
    # Reverse with an "edit" model (another mixture): more control = closer to the reference y0.
    y0 = image(model)
    noise, _ = run(controlled_forward, model, y0, up(), gamma=0.5, seed=0)
    edit = GaussianMixtureDenoiser.random(shape=SHAPE, components=3, seed=5, parameterization="flow")
    dist = []
    for eta in (0.0, 0.25, 0.5, 0.75, 1.0):
        out, _ = run(controlled_reverse, edit, noise, down(), y0, eta=eta, start=0.0, stop=0.5)
        dist.append((out - y0).norm().item())
    assert all(b < a for a, b in zip(dist, dist[1:])), dist


def test_eta_one_over_all_steps_returns_the_reference(model):
    # D' = y0 on every step; the last Euler step onto sigma = 0 returns D' (float32 rounding).
    y0, x1 = image(model), torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(2))
    out, _ = run(controlled_reverse, model, x1, down(), y0, eta=1.0, stop=1.0)
    assert (out - y0).abs().max() < 1e-5


def test_eta_schedule_uses_step_fractions_and_trends():
    assert eta_schedule(0.8, 8, 0.0, 0.25) == [0.8, 0.8, 0, 0, 0, 0, 0, 0]
    assert eta_schedule(1.0, 10, 0.1, 0.4, "linear_increase") == pytest.approx([0, 1 / 3, 2 / 3, 1] + [0] * 6)
    assert eta_schedule(1.0, 10, 0.0, 0.3, "linear_decrease") == pytest.approx([1, 2 / 3, 1 / 3] + [0] * 7)
    assert eta_schedule(1.0, 10, 0.0, 0.3)[3] == 0   # 0.3*10 = 3.0000000000000004 is still 3 steps


def test_same_seed_gives_identical_output(model):
    x0 = image(model)
    a, _ = run(controlled_forward, model, x0, up(), gamma=0.5, seed=11)
    b, _ = run(controlled_forward, model, x0, up(), gamma=0.5, seed=11)
    assert torch.equal(a, b)


def test_batch_gets_independent_y1_and_equals_single_runs(model):
    # Rows of one batch use seeds 4 and 5; the denoiser is per row, so batching only reorders
    # float64 reductions: 1e-6 covers that rounding after 12 float32 steps.
    x0 = image(model).repeat(2, 1, 1, 1)
    batch, _ = run(controlled_forward, model, x0, up(), gamma=1.0, seed=4)
    assert (batch[0] - batch[1]).abs().max() > 0.5
    for b in range(2):
        single, _ = run(controlled_forward, model, x0[b:b + 1], up(), gamma=0.5, seed=4 + b)
        batched, _ = run(controlled_forward, model, x0, up(), gamma=0.5, seed=4)
        assert (batched[b] - single[0]).abs().max() < 1e-6


def test_sde_variants_are_finite_at_sigma_one_and_seeded(model):
    x0 = image(model, 2)
    noise, _ = run(controlled_forward_sde, model, x0, up(), gamma=0.5, seed=1)
    again, _ = run(controlled_forward_sde, model, x0, up(), gamma=0.5, seed=1)
    other, _ = run(controlled_forward_sde, model, x0, up(), gamma=0.5, seed=2)
    assert torch.isfinite(noise).all() and torch.equal(noise, again) and not torch.equal(noise, other)
    out, info = run(controlled_reverse_sde, model, noise, down(), x0, eta=0.9, stop=0.25, seed=1)
    out_again, _ = run(controlled_reverse_sde, model, noise, down(), x0, eta=0.9, stop=0.25, seed=1)
    assert torch.isfinite(out).all() and torch.equal(out, out_again) and info.model_calls == STEPS


def test_reverse_sde_at_eta_zero_samples_the_data_distribution():
    # Checks the drift sign and 1/(1 - sigma) terms: data N(0.5, 0.3^2); 512 x 16 values give a
    # sampling error ~0.3%, Euler-Maruyama with 28 steps adds ~1% (measured 0.303): 5% bound.
    data = GaussianMixtureDenoiser(torch.full((1, 1, 4, 4), 0.5), [0.3], [1.0], "flow")
    x1 = torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out, _ = run(controlled_reverse_sde, data, x1, torch.linspace(1, 0, 29), x1, eta=0.0, seed=0)
    assert abs(out.mean().item() - 0.5) < 0.015 and abs(out.std().item() - 0.3) < 0.015


def test_forward_sde_at_gamma_one_is_the_ode_pull_to_y1(model):
    # No diffusion at gamma = 1: exact transition lands on y1 exactly as the ODE does (float32).
    x0 = image(model)
    sde, _ = run(controlled_forward_sde, model, x0, up(), gamma=1.0, seed=9)
    ode, _ = run(controlled_forward, model, x0, up(), gamma=1.0, seed=9)
    assert (sde - ode).abs().max() < 1e-5


def test_rejects_a_schedule_in_the_wrong_direction(model):
    with pytest.raises(ValueError):
        controlled_forward(model, image(model), down())
