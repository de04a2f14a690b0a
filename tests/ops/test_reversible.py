"""The reversible samplers (O-BELM capped, O-BELM, BDIA) and their algebraic inverses on the closed-form
Gaussian-mixture denoiser, in float32 as ComfyUI holds latents: invert-then-regenerate is exact to float32
rounding at every cfg and step count, for a latent the sampler made and for one it did not."""
import pytest
import torch

from inversion_ops import reversible as rv
from inversion_ops.common import StepLog
from tests.support.analytic import GaussianMixtureDenoiser, cfg_denoiser
from tests.support.metrics import nmse_db
from tests.support.schedules import flow_sigmas, karras_sigmas

torch.set_num_threads(1)
LIMIT_DB = -100.0   # the target for float32


def make_case(parameterization, cfg, steps, seed=1):
    cond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.6, 0.3, 0.1])
    uncond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.2, 0.3, 0.5])
    sigmas = (karras_sigmas(steps) if parameterization == "eps" else flow_sigmas(steps)).float()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    return cfg_denoiser(cond, uncond, cfg), sigmas, noise


def invert_then_regenerate(denoise, latent, sigmas, **options):
    """(start, second state, regenerated latent, model calls of the inverse and of the regeneration)."""
    log = StepLog()
    kept = {}
    start = rv.invert_reversible(denoise, latent, sigmas.flip(0), callback=log.tee(lambda d: kept.update(
        {"previous": d["previous"]} if "previous" in d else {})), **options)
    regenerate_log = StepLog()
    regenerated = rv.sample_reversible(denoise, start, sigmas, callback=regenerate_log, previous=kept["previous"],
                                       **options)
    return start, kept["previous"], regenerated, log.model_calls, regenerate_log.model_calls


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
@pytest.mark.parametrize("cfg", [1.0, 5.0, 9.0])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_round_trip_is_exact_at_one_model_call_per_step(parameterization, cfg, steps):
    denoise, sigmas, noise = make_case(parameterization, cfg, steps)
    generated = rv.sample_reversible(denoise, noise, sigmas)
    photo = GaussianMixtureDenoiser.random(parameterization=parameterization).sample(
        2, torch.Generator().manual_seed(5)).float()          # data, not a sample of this sampler
    for latent in (generated, photo):
        start, previous, regenerated, calls, regenerate_calls = invert_then_regenerate(denoise, latent, sigmas)
        assert nmse_db(regenerated, latent).max() <= LIMIT_DB
        assert (calls, regenerate_calls) == (steps, steps - 1)   # one naive step picks the state beside x
        assert torch.isfinite(start).all() and 0.5 < float(start.std() / sigmas[0]) < 2.0


@pytest.mark.parametrize("variant", list(rv.VARIANTS))
def test_every_variant_inverts_its_own_steps(variant):
    denoise, sigmas, noise = make_case("eps", 3.0, 12)
    generated = rv.sample_reversible(denoise, noise, sigmas, variant=variant, gamma=0.8)
    *_, regenerated, _, _ = invert_then_regenerate(denoise, generated, sigmas, variant=variant, gamma=0.8)
    assert nmse_db(regenerated, generated).max() <= LIMIT_DB


def test_the_state_a_sampler_reports_brings_back_its_own_noise():
    denoise, sigmas, noise = make_case("eps", 5.0, 20)
    kept = {}
    generated = rv.sample_reversible(denoise, noise, sigmas, callback=lambda d: kept.update(
        {"previous": d["previous"]} if "previous" in d else {}))
    start = rv.invert_reversible(denoise, generated, sigmas.flip(0), previous=kept["previous"])
    # with the true second state the inverse retraces the sampler's own path
    assert nmse_db(start, noise).max() <= LIMIT_DB


def test_reruns_are_bit_identical():
    denoise, sigmas, noise = make_case("flow", 7.0, 10)
    first = [rv.sample_reversible(denoise, noise, sigmas)]
    first += list(invert_then_regenerate(denoise, first[0], sigmas)[:3])
    second = [rv.sample_reversible(denoise, noise, sigmas)]
    second += list(invert_then_regenerate(denoise, second[0], sigmas)[:3])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_callback_reports_what_comfyui_reads():
    denoise, sigmas, noise = make_case("eps", 2.0, 5)
    records = []
    rv.sample_reversible(denoise, noise, sigmas, callback=records.append)
    assert [r["i"] for r in records] == list(range(5))
    assert all({"x", "sigma", "denoised"} <= set(r) for r in records)
    assert "previous" in records[-1] and not any("previous" in r for r in records[:-1])


def test_a_second_state_of_the_wrong_shape_is_refused_by_name():
    denoise, sigmas, noise = make_case("eps", 1.0, 4)
    with pytest.raises(ValueError, match="previous .*second state.* shape"):
        rv.sample_reversible(denoise, noise, sigmas, previous=noise[:1])
    with pytest.raises(ValueError, match="previous .*NaN"):
        rv.invert_reversible(denoise, noise, sigmas.flip(0), previous=noise * float("nan"))


def test_bad_variant_gamma_and_order_are_refused():
    denoise, sigmas, noise = make_case("eps", 1.0, 4)
    with pytest.raises(ValueError, match="variant"):
        rv.sample_reversible(denoise, noise, sigmas, variant="edict")
    with pytest.raises(ValueError, match="gamma"):
        rv.sample_reversible(denoise, noise, sigmas, variant="bdia", gamma=0.0)
    with pytest.raises(ValueError, match="descending"):
        rv.sample_reversible(denoise, noise, sigmas.flip(0))
