"""Shooting inversion (inversion_ops.multistep) on the closed-form Gaussian mixture, with the pack's
re-implementations of ComfyUI's samplers as the black box (ComfyUI's own functions are exercised in
tests/test_exact_nodes.py and bench/exact/samplers.py).

float64 model maths; the tolerance is the regeneration error's RMS per element, so "exact" here is
a regenerated latent within -90 dB of the input (latents of RMS ~1).
"""
import pytest
import torch

from inversion_ops import multistep
from inversion_ops.common import StepLog
from tests.ops.test_exact import make_case
from tests.support.metrics import nmse_db
from tests.support.reference_samplers import BASE_SHOOTING_RUNS as BASE_RUNS, sample_dpmpp_2m, sample_euler

torch.set_num_threads(1)


def regenerate(sample, model, start, sigmas):
    return sample(model, start.clone(), sigmas.clone())


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
@pytest.mark.parametrize("sample", [sample_dpmpp_2m, sample_euler], ids=["dpmpp_2m", "euler"])
def test_shooting_regenerates_the_latent_at_10_steps_cfg_5(parameterization, sample):
    model, sigmas, noise = make_case(parameterization, cfg=5.0, steps=10, batch=2)
    x0 = regenerate(sample, model, noise, sigmas)
    log = StepLog()
    found = multistep.exact_inversion_shooting(model, x0, sigmas.flip(0), callback=log, sample=sample,
                                               runs=BASE_RUNS, tolerance=1e-8)
    assert nmse_db(regenerate(sample, model, found, sigmas), x0).max() < -90
    # the naive start alone is far off: shooting did the work
    naive = multistep.naive_inversion(model, x0, sigmas.flip(0))
    assert nmse_db(regenerate(sample, model, naive, sigmas), x0).max() > -40
    assert log.model_calls > 0 and len(log.records) >= 2


def test_shooting_returns_each_samples_best_iterate_and_reports_its_error():
    model, sigmas, noise = make_case("eps", cfg=5.0, steps=10, batch=2)
    x0 = regenerate(sample_dpmpp_2m, model, noise, sigmas)
    log = StepLog()
    found = multistep.exact_inversion_shooting(model, x0, sigmas.flip(0), callback=log, sample=sample_dpmpp_2m,
                                               runs=BASE_RUNS, max_iterations=3)
    reported = torch.tensor(log.series("residual"))            # (iterations, batch)
    error = (regenerate(sample_dpmpp_2m, model, found, sigmas) - x0).pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(error, reported.min(0).values.to(error.dtype), rtol=1e-6)


def test_shooting_stops_at_its_model_call_budget():
    model, sigmas, noise = make_case("flow", cfg=5.0, steps=10)
    x0 = regenerate(sample_dpmpp_2m, model, noise, sigmas)
    calls = []

    def counting(x, sigma, **extra_args):
        calls.append(1)
        return model(x, sigma, **extra_args)
    multistep.exact_inversion_shooting(counting, x0, sigmas.flip(0), sample=sample_dpmpp_2m, runs=BASE_RUNS,
                                       tolerance=1e-30, max_iterations=1000, max_model_calls=100)
    # the budget is checked between solver iterations: past it, the euler start's remaining steps cost up to 2
    # calls each (10) and the shooting's first iteration, a sampling run and a naive inversion, 20; the second
    # run from N(x) does not start once the budget is spent
    assert 100 <= len(calls) <= 100 + 10 + 20


def test_shooting_hands_extra_args_to_the_sampler_and_the_model():
    model, sigmas, noise = make_case("eps", cfg=3.0, steps=4)
    seen = []

    def recording(x, sigma, **extra_args):
        seen.append(extra_args.get("model_options"))
        return model(x, sigma)
    x0 = regenerate(sample_euler, model, noise, sigmas)
    multistep.exact_inversion_shooting(recording, x0, sigmas.flip(0), {"model_options": {"patch": 1}},
                                       sample=sample_euler, runs=BASE_RUNS, max_iterations=2)
    assert seen and all(options == {"patch": 1} for options in seen)


def test_shooting_needs_the_sampler_function_and_its_runs():
    model, sigmas, noise = make_case("eps", cfg=1.0, steps=2)
    with pytest.raises(ValueError, match="sample"):
        multistep.exact_inversion_shooting(model, noise, sigmas.flip(0))
    with pytest.raises(ValueError, match="runs"):
        multistep.exact_inversion_shooting(model, noise, sigmas.flip(0), sample=sample_euler)
    with pytest.raises(ValueError, match="runs"):
        multistep.exact_inversion_shooting(model, noise, sigmas.flip(0), sample=sample_euler, runs=("naive",))


def test_a_later_run_starts_only_for_the_samples_the_earlier_ones_leave_above_minus_60_db():
    # the first run starts at the true noise of sample 0 and at zeros for sample 1: sample 0 regenerates at
    # once, so the second run's start is asked for sample 1's sake, and sample 0 comes back as it was, not
    # from the second start (off by 1 there)
    model, sigmas, noise = make_case("eps", cfg=5.0, steps=6, batch=2)
    x0 = regenerate(sample_euler, model, noise, sigmas)
    asked = []

    def start_at(z):
        def start(model, x, sigmas, extra_args, **options):
            asked.append(z)
            return z
        return start
    half_right = torch.stack([noise[0], torch.zeros_like(noise[1])])
    off_for_sample_0 = torch.stack([noise[0] + 1.0, noise[1]])
    runs = (multistep.ShootingRun(multistep.naive_inversion, start_at(half_right)),
            multistep.ShootingRun(multistep.naive_inversion, start_at(off_for_sample_0)))
    found = multistep.exact_inversion_shooting(model, x0, sigmas.flip(0), sample=sample_euler, runs=runs,
                                               max_iterations=1)
    assert len(asked) == 2 and torch.equal(found[0], noise[0].to(found.dtype))
    # both samples right from the start: no later run
    asked.clear()
    runs = (multistep.ShootingRun(multistep.naive_inversion, start_at(noise)),) + runs[1:]
    multistep.exact_inversion_shooting(model, x0, sigmas.flip(0), sample=sample_euler, runs=runs, max_iterations=1)
    assert len(asked) == 1
