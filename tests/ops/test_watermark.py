"""Tree-Ring rings watermarks (inversion_ops.watermark) on Gaussian noise and through exact inversion of the
closed-form Gaussian-mixture denoiser.

Calibration bounds: the issue asks for a false-positive rate within +-50% of the nominal 1%. With n clean
samples the measured rate has a binomial spread of sqrt(0.01 * 0.99 / n): 0.16% at n = 4000 and 0.31% at
n = 1000, so the +-0.5% band is 3 and 1.6 spreads wide.
"""
import math

import pytest
import torch

from inversion_ops import exact, watermark
from tests.support.analytic import GaussianMixtureDenoiser
from tests.support.reference_samplers import sample_euler

torch.set_num_threads(1)   # small tensors: threads only contend for the 2 shared cores
FPR = 0.01


def gaussian(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ distributions against scipy

def test_noncentral_chi_squared_cdf_matches_scipy_from_the_bulk_to_the_far_tail():
    stats = pytest.importorskip("scipy.stats")
    for x, df, nc in [(10.0, 5, 3.0), (300.0, 317, 300.0), (50.0, 317, 300.0), (1.0, 29, 20.0), (0.5, 3, 0.0)]:
        expected = stats.ncx2.cdf(x, df, nc) if nc else stats.chi2.cdf(x, df)
        assert math.isclose(float(watermark.ncx2_cdf(x, df, nc)), expected, rel_tol=1e-9), (x, df, nc)


def test_regularized_beta_matches_scipy_in_both_tails():
    stats = pytest.importorskip("scipy.stats")
    for a, x in [(14.0, 0.3), (158.0, 0.4), (158.0, 0.2), (3.0, 0.9), (0.5, 0.01), (40.0, 0.01)]:
        assert math.isclose(watermark.regularized_beta(a, a, x), stats.beta.cdf(x, a, a), rel_tol=1e-9), (a, x)


# ------------------------------------------------------------------ key and embedding

def test_key_comes_from_the_key_seed_alone():
    assert torch.equal(watermark.ring_key(7, 10), watermark.ring_key(7, 10))
    assert not torch.equal(watermark.ring_key(7, 10), watermark.ring_key(8, 10))
    # torch's CPU generator is the same on every machine: these numbers must never change
    expected = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(0.5)
    assert torch.equal(watermark.ring_key(0, 3), expected)


def test_embedding_writes_the_rings_into_one_channel_and_keeps_the_rest_of_the_spectrum():
    noise = gaussian((2, 4, 32, 32), 0)
    before = noise.clone()
    marked = watermark.embed_rings(noise, key_seed=5, channel=2, radius=6)
    assert torch.equal(noise, before), "the input is not modified"
    assert marked.dtype == noise.dtype and marked.shape == noise.shape
    assert torch.equal(marked[:, [0, 1, 3]], noise[:, [0, 1, 3]])
    ring = watermark.ring_index(32, 32, 6)
    spectrum = torch.fft.fftshift(torch.fft.fft2(marked[:, 2].double(), norm="ortho"), dim=(-2, -1))
    original = torch.fft.fftshift(torch.fft.fft2(noise[:, 2].double(), norm="ortho"), dim=(-2, -1))
    key = torch.cat([torch.zeros(1, dtype=torch.float64), watermark.ring_key(5, 6)])[ring]
    # float32 round trip through the FFT: ~1e-7 relative to unit-variance coefficients
    assert (spectrum[:, ring > 0] - key[ring > 0]).abs().max() < 1e-5
    assert (spectrum[:, ring == 0] - original[:, ring == 0]).abs().max() < 1e-5
    assert not torch.allclose(marked[0, 2], marked[1, 2]), "per-sample noise, one key"


def test_ring_must_fit_inside_the_nyquist_frequencies_and_the_channel_must_exist():
    noise = gaussian((1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="radius 4 .* 1 to 3"):
        watermark.embed_rings(noise, channel=0, radius=4)
    with pytest.raises(ValueError, match="channel 4 does not exist"):
        watermark.detect(noise, channel=4, radius=3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        watermark.detect(noise[None], channel=0, radius=3)


# ------------------------------------------------------------------ detection on noise

def test_p_value_is_calibrated_on_clean_gaussian_noise():
    rates = {}
    for height, radius in ((8, 3), (16, 5), (64, 10)):
        p = torch.cat([watermark.detect(gaussian((500, 4, height, height), seed), seed, 3, radius)["p_value"]
                       for seed in range(8)])
        rates[height] = float((p < FPR).double().mean())
    assert all(0.5 * FPR <= rate <= 1.5 * FPR for rate in rates.values()), rates


def test_watermarked_noise_is_detected_and_a_wrong_key_on_it_is_not():
    marked = watermark.embed_rings(gaussian((4, 4, 64, 64), 1), key_seed=11, channel=3, radius=10)
    right = watermark.detect(marked, 11, 3, 10)
    assert (right["p_value"] < 1e-30).all()
    assert (right["distance"] < 1e-5).all()
    # keys 11 and 12 give uncorrelated rings; random pairs can correlate (see watermark.detect)
    wrong = watermark.detect(marked, 12, 3, 10)
    assert (wrong["p_value"] > FPR).all()
    assert (wrong["distance"] > 0.3).all()


def test_detection_of_a_batch_equals_detection_of_each_sample():
    marked = watermark.embed_rings(gaussian((3, 4, 16, 16), 2), key_seed=1, channel=0, radius=5)
    marked[1] = gaussian((4, 16, 16), 3)   # a clean one in the middle
    batch = watermark.detect(marked, 1, 0, 5)
    for b in range(3):
        single = watermark.detect(marked[b:b + 1], 1, 0, 5)
        for key in ("distance", "statistic", "p_value", "p_value_plugin"):
            assert torch.allclose(batch[key][b:b + 1], single[key], rtol=1e-12, atol=0), (key, b)
    assert batch["p_value"][0] < 1e-10 and batch["p_value"][1] > FPR and batch["p_value"][2] < 1e-10


def test_detection_is_scale_free_like_the_papers_variance_estimate():
    marked = watermark.embed_rings(gaussian((2, 4, 16, 16), 4, torch.float64), key_seed=3, channel=1, radius=5)
    noisy = marked + 0.3 * gaussian((2, 4, 16, 16), 5, torch.float64)
    a, b = watermark.detect(noisy, 3, 1, 5), watermark.detect(14.6 * noisy, 3, 1, 5)
    assert torch.allclose(a["p_value"], b["p_value"], rtol=1e-9)


# ------------------------------------------------------------------ through an exact inversion

def test_p_value_is_calibrated_through_exact_inversion_of_the_analytic_model():
    """Clean images from the Gaussian-mixture EPS model (euler, 10 steps), inverted exactly: the recovered
    noise is the Gaussian starting noise, so the false-positive rate stays at the nominal rate; watermarked
    ones are all detected."""
    shape, radius, n = (4, 16, 16), 5, 1000
    model = GaussianMixtureDenoiser.random(shape=shape, components=3, seed=0)
    sigmas = torch.linspace(14.6, 0.0, 11, dtype=torch.float64)

    def generate_and_invert(noise):
        image = sample_euler(model, sigmas[0] * noise, sigmas)
        return exact.exact_inversion_euler(model, image, sigmas.flip(0), tolerance=1e-8) / sigmas[0]

    clean = generate_and_invert(gaussian((n, *shape), 6, torch.float64))
    p = watermark.detect(clean, key_seed=9, channel=3, radius=radius)["p_value"]
    rate = float((p < FPR).double().mean())
    assert 0.5 * FPR <= rate <= 1.5 * FPR, rate
    marked = watermark.embed_rings(gaussian((20, *shape), 7, torch.float64), key_seed=9, channel=3, radius=radius)
    assert (watermark.detect(generate_and_invert(marked), 9, 3, radius)["p_value"] < 1e-10).all()
