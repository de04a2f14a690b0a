"""Backward-Euler exact inversion (Hong et al. 2024) on the closed-form Gaussian-mixture denoiser.

The analytic model runs in float64, so per-step solves can reach ~1e-12 and the tolerances
below come from the solver tolerance (1e-6 RMS per element here) amplified by the sampler's
contraction (x0 spreads ~0.3 where x_T spreads ~15, so ~50x), not from model error.
"""

import pytest
import torch

from inversion_ops import exact as be
from inversion_ops.common import StepLog
from tests.support.analytic import GaussianMixtureDenoiser, cfg_denoiser
from tests.support.metrics import nmse_db
from tests.support.reference_samplers import sample_dpmpp_2m, sample_euler
from tests.support.schedules import flow_sigmas, karras_sigmas

TOL = 1e-6
# tiny tensors: intra-op threads only contend for the 2 shared cores (softmax took ms per call)
torch.set_num_threads(1)


def run(invert, *args, **options):
    """(result, StepLog) of an inversion function called with the k-diffusion signature."""
    log = StepLog()
    return invert(*args, callback=log, **options), log


def make_case(parameterization, cfg, steps, batch=1, seed=1):
    """Cond / uncond mixtures on the same components with different weights, so CFG matters."""
    cond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.6, 0.3, 0.1])
    uncond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.2, 0.3, 0.5])
    sigmas = karras_sigmas(steps) if parameterization == "eps" else flow_sigmas(steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64) * sigmas[0]
    return cfg_denoiser(cond, uncond, cfg), sigmas, noise


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_exact_euler_inversion_recovers_noise_below_minus_60_db(parameterization):
    denoise, sigmas, noise = make_case(parameterization, cfg=1.0, steps=10)
    image = sample_euler(denoise, noise, sigmas)
    recovered, info = run(be.exact_inversion_euler, denoise, image, sigmas.flip(0), tolerance=TOL)
    # per-step residual 1e-6 x ~50 contraction is ~-80 dB; -60 dB leaves margin
    assert nmse_db(recovered, noise).max() < -60
    assert not any(any(capped) for capped in info.hit_cap)
    assert max(max(r) for r in info.residuals) < TOL


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_exact_euler_beats_naive_by_20_db_at_cfg_5(parameterization):
    denoise, sigmas, noise = make_case(parameterization, cfg=5.0, steps=10)
    image = sample_euler(denoise, noise, sigmas)
    naive = be.naive_inversion(denoise, image, sigmas.flip(0))
    exact = be.exact_inversion_euler(denoise, image, sigmas.flip(0), tolerance=TOL)
    # naive is off by ~-10 dB here (visibly wrong); exact is limited only by the tolerance
    assert nmse_db(naive, noise).max() > -15
    assert nmse_db(exact, noise).max() < nmse_db(naive, noise).min() - 20


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_dpmpp_2m_paper_pass_beats_naive_by_10_db(parameterization):
    denoise, sigmas, noise = make_case(parameterization, cfg=1.0, steps=10)
    image = sample_dpmpp_2m(denoise, noise, sigmas)
    naive = be.naive_inversion(denoise, image, sigmas.flip(0))
    paper = be.exact_inversion_dpmpp_2m(denoise, image, sigmas.flip(0), tolerance=TOL, refine_passes=0)
    # the held-fixed old_denoised from a fine naive path is approximate: a clear gain, not exact
    assert nmse_db(paper, noise).max() < nmse_db(naive, noise).min() - 10


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_dpmpp_2m_refined_inversion_round_trips_below_minus_60_db(parameterization):
    denoise, sigmas, noise = make_case(parameterization, cfg=1.0, steps=10)
    image = sample_dpmpp_2m(denoise, noise, sigmas)
    naive = be.naive_inversion(denoise, image, sigmas.flip(0))
    exact = be.exact_inversion_dpmpp_2m(denoise, image, sigmas.flip(0), tolerance=TOL)
    # refine passes converge to the exact multistep inverse: same budget as the Euler test
    assert nmse_db(exact, noise).max() < -60
    assert nmse_db(exact, noise).max() < nmse_db(naive, noise).min() - 20
    regenerated = sample_dpmpp_2m(denoise, exact, sigmas)
    assert nmse_db(regenerated, image).max() < -60


def test_anderson_needs_at_most_a_third_of_the_fixed_point_model_calls():
    denoise, sigmas, noise = make_case("eps", cfg=3.0, steps=10)
    image = sample_euler(denoise, noise, sigmas)
    runs = {solver: run(be.exact_inversion_euler, denoise, image, sigmas.flip(0), solver=solver, tolerance=TOL,
                        max_iterations=500)   # the paper's cap: its fixed point needs it
            for solver in ("fixed_point", "anderson")}
    for _, info in runs.values():   # both reach the same per-step tolerance
        assert not any(any(capped) for capped in info.hit_cap)
        assert max(max(r) for r in info.residuals) < TOL
    assert 3 * runs["anderson"][1].model_calls <= runs["fixed_point"][1].model_calls


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m"])
def test_batch_of_two_equals_two_single_runs(method):
    # cfg 1 keeps every per-step equation well posed, so no sample ends at the iteration cap
    denoise, sigmas, noise = make_case("eps", cfg=1.0, steps=6, batch=2)
    sample = sample_euler if method == "euler" else sample_dpmpp_2m
    invert = be.exact_inversion_euler if method == "euler" else be.exact_inversion_dpmpp_2m
    image = sample(denoise, noise, sigmas)
    batched, info = run(invert, denoise, image, sigmas.flip(0), tolerance=TOL)
    singles = [invert(denoise, image[b:b + 1], sigmas.flip(0), tolerance=TOL) for b in range(2)]
    # per-sample stopping makes each row's arithmetic identical; 1e-9 allows BLAS reordering
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-9)
    assert not any(any(capped) for capped in info.hit_cap)
    assert all(len(step) == 2 for step in info.residuals)


@pytest.mark.parametrize("method", ["naive", "euler", "dpmpp_2m"])
def test_flow_schedule_ending_at_sigma_one_is_finite(method):
    denoise, sigmas, noise = make_case("flow", cfg=5.0, steps=4, batch=2)
    assert sigmas[0] == 1.0
    image = sample_euler(denoise, noise, sigmas)
    invert = {"naive": be.naive_inversion, "euler": be.exact_inversion_euler,
              "dpmpp_2m": be.exact_inversion_dpmpp_2m}[method]
    recovered, info = run(invert, denoise, image.float(), sigmas.flip(0).float())
    assert torch.isfinite(recovered).all()
    assert all(torch.isfinite(torch.tensor(r)).all() for r in info.residuals)


def test_dpmpp_2m_step_to_sigma_zero_returns_the_denoised_estimate():
    x, denoised = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = be.dpmpp_2m_step(x, denoised, torch.randn_like(x), torch.tensor(2.0), torch.tensor(0.5),
                           torch.tensor(0.0))
    torch.testing.assert_close(out, denoised, rtol=0, atol=0)   # exp(-inf) = 0, expm1(-inf) = -1


def test_descending_sigmas_are_refused():
    denoise, sigmas, noise = make_case("eps", cfg=1.0, steps=4)
    with pytest.raises(ValueError, match="ascending"):
        be.exact_inversion_euler(denoise, noise, sigmas)


@pytest.fixture(scope="module")
def comfy_sampling(comfy):
    """ComfyUI's own k-diffusion samplers, imported after the session's ComfyUI is set up."""
    import importlib
    return importlib.import_module("comfy.k_diffusion.sampling")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_reference_samplers_match_comfyui_bit_for_bit(comfy_sampling, sampler):
    denoise, sigmas, noise = make_case("eps", cfg=3.0, steps=6)
    sigmas, noise = sigmas.float(), noise.float()
    model = lambda x, sigma, **kwargs: denoise(x, sigma)
    ours = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}[sampler]
    theirs = getattr(comfy_sampling, f"sample_{sampler}")
    assert torch.equal(ours(denoise, noise, sigmas), theirs(model, noise, sigmas, disable=True))


def test_naive_inversion_matches_flipsigmas_plus_comfyui_euler(comfy_sampling):
    denoise, sigmas, noise = make_case("eps", cfg=3.0, steps=6)
    image = sample_euler(denoise, noise.float(), sigmas.float())
    flipped = sigmas.float().flip(0).clone()
    flipped[0] = 1e-4   # what FlipSigmas does to a leading 0
    model = lambda x, sigma, **kwargs: denoise(x, sigma)
    ours = be.naive_inversion(denoise, image, sigmas.float().flip(0))
    assert torch.equal(ours, comfy_sampling.sample_euler(model, image, flipped, disable=True))


def bf16_rounded(denoise):
    """The model as a bf16 network sees it: input and output carry bfloat16's rounding."""
    return lambda x, sigma: denoise(x.to(torch.bfloat16).to(x.dtype), sigma).to(torch.bfloat16).to(x.dtype)


def test_tolerance_raised_to_the_bf16_floor_is_reached_without_running_to_the_cap():
    from inversion_ops.common import reachable_tolerance
    denoise, sigmas, noise = make_case("eps", cfg=5.0, steps=4, batch=2)
    model = bf16_rounded(denoise)
    image = sample_euler(model, noise.float(), sigmas.float())
    _, below = run(be.exact_inversion_euler, model, image, sigmas.float().flip(0), tolerance=1e-4)
    raised = reachable_tolerance(1e-4, torch.bfloat16)
    _, floor = run(be.exact_inversion_euler, model, image, sigmas.float().flip(0), tolerance=raised)
    # measured floor ~5e-4 RMS: 1e-4 cannot be reached, so steps run until the solver gives up
    assert any(any(capped) for capped in below.hit_cap)
    assert not any(any(capped) for capped in floor.hit_cap)
    assert 2 * floor.model_calls < below.model_calls


def euler_one_step(model, x, sigmas, extra_args):
    """The reference euler sampler as a black-box one-step function (what nodes build from ComfyUI's)."""
    return sample_euler(model, x, sigmas, extra_args)


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_black_box_one_step_inversion_equals_the_closed_form_euler_one(parameterization):
    # the same equation solved from the same guess: only the step's arithmetic path differs
    denoise, sigmas, noise = make_case(parameterization, cfg=5.0, steps=6, batch=2)
    image = sample_euler(denoise, noise, sigmas)
    closed, _ = run(be.exact_inversion_euler, denoise, image, sigmas.flip(0), tolerance=TOL)
    black_box, log = run(be.exact_inversion_one_step, denoise, image, sigmas.flip(0), step=euler_one_step,
                         tolerance=TOL)
    torch.testing.assert_close(black_box, closed, rtol=0, atol=1e-8)
    assert max(max(r) for r in log.residuals) < TOL and log.model_calls > 0


def test_one_step_inversion_without_a_step_function_is_refused():
    denoise, sigmas, noise = make_case("eps", cfg=1.0, steps=2)
    with pytest.raises(ValueError, match="step"):
        be.exact_inversion_one_step(denoise, noise, sigmas.flip(0))


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m"])
def test_a_run_that_cannot_converge_stops_at_its_model_call_budget(method):
    # tolerance 0 is never reached: without the budget every step runs to its cap (and dpmpp_2m adds up
    # to 20 refine passes). With it the solvers stop; what is left costs no more than one guess and one
    # residual per step (euler), or the paper's pass and one refine pass without iterations (dpmpp_2m)
    denoise, sigmas, noise = make_case("eps", cfg=5.0, steps=6)
    sample = sample_euler if method == "euler" else sample_dpmpp_2m
    invert = be.exact_inversion_euler if method == "euler" else be.exact_inversion_dpmpp_2m
    image = sample(denoise, noise, sigmas)
    budget = 40
    x, log = run(invert, denoise, image, sigmas.flip(0), tolerance=0.0, max_model_calls=budget)
    unbounded = run(invert, denoise, image, sigmas.flip(0), tolerance=0.0, max_model_calls=0)[1].model_calls
    if method == "euler":
        overshoot = 2 * 6
    else:
        one_pass = run(invert, denoise, image, sigmas.flip(0), tolerance=0.0, max_iterations=0,
                       refine_passes=0)[1].model_calls
        overshoot = 2 * one_pass
    assert torch.isfinite(x).all()
    assert log.model_calls <= budget + overshoot < unbounded, (log.model_calls, budget + overshoot, unbounded)


def euler_cfg_pp_sample(guided_and_uncond, x, sigmas):
    """ComfyUI's `sample_euler_cfg_pp` arithmetic: x_next = D_c + sigma_next * (x - D_u) / sigma."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        guided, uncond = guided_and_uncond(None, x, sigma.expand(x.shape[0]), {})
        x = guided + sigma_next * (x - uncond) / sigma
    return x


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_cfg_pp_naive_inversion_is_exact_where_the_predictions_do_not_depend_on_x(parameterization):
    # Noise predictions eps = (x - D) / sigma that depend on sigma alone: naive inversion's one approximation,
    # the prediction at the known x in place of the unknown one, then costs nothing, so the CFG++ inversion
    # must return the very noise the CFG++ sampler started from. The CFG inversion must not.
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def guided_and_uncond(model, x, sigma, extra_args):
        s = sigma.reshape(-1, 1, 1, 1)
        eps_uncond = a + s * b
        return x - s * (eps_uncond + 5.0 * (c - s * a)), x - s * eps_uncond
    sigmas = karras_sigmas(8) if parameterization == "eps" else flow_sigmas(8)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * sigmas[0]
    image = euler_cfg_pp_sample(guided_and_uncond, noise, sigmas)
    found, log = run(be.naive_inversion_cfg_pp, lambda x, sigma, **kw: x, image, sigmas.flip(0),
                     guided_and_uncond=guided_and_uncond)
    assert float(nmse_db(found, noise).max()) < -200 and log.model_calls == 0   # the stub model is never called
    guided_only = be.naive_inversion(lambda x, sigma, **kw: guided_and_uncond(None, x, sigma, {})[0], image, sigmas.flip(0))
    assert float(nmse_db(guided_only, noise).min()) > -20


def test_cfg_pp_naive_inversion_without_the_unconditional_prediction_is_refused():
    denoise, sigmas, noise = make_case("eps", cfg=1.0, steps=2)
    with pytest.raises(ValueError, match="guided_and_uncond"):
        be.naive_inversion_cfg_pp(denoise, noise, sigmas.flip(0))
