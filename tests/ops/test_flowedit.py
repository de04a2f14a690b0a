"""FlowEdit on closed-form flow denoisers: point masses (the ODE's answer is known exactly) and the Gaussian
mixture (masks, batches, video shapes)."""
import pytest
import torch

from inversion_ops.flowedit import flow_edit
from tests.support.analytic import GaussianMixtureDenoiser
from tests.support.schedules import flow_sigmas

SHAPE = (4, 8, 8)


class TwoPrompts:
    """D = `source` with source_args' flag, else D = `target`: denoisers of two point masses."""

    def __init__(self, source, target):
        self.source, self.target = source, target

    def __call__(self, x, sigma, branch="target"):
        return (self.source if branch == "source" else self.target).expand_as(x).to(x)


def _points(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, *shape, generator=g) for _ in range(3))


def test_point_masses_move_the_source_by_the_difference_of_the_two_points():
    # dZ/dsigma = ((Z - x0) - (b - a))/sigma from Z = x0: W = Z - x0 - (b - a) scales as sigma, and each Euler
    # step multiplies W by sigma_next/sigma exactly, so Z ends at x0 + b - a whatever the noise (rounding only)
    x0, a, b = _points()
    out = flow_edit(TwoPrompts(a, b), x0, flow_sigmas(10).float(), source_args={"branch": "source"}, n_max=7, n_min=0)
    assert (out - (x0 + b - a)).abs().max() < 1e-5


def test_n_min_equal_to_n_max_is_plain_sampling_of_the_target():
    # no edited steps: the coupled point is noised source, and Euler with D = b lands on b at sigma 0
    x0, a, b = _points(1)
    out = flow_edit(TwoPrompts(a, b), x0, flow_sigmas(6).float(), source_args={"branch": "source"}, n_max=4, n_min=4)
    assert (out - b).abs().max() < 1e-5


def test_equal_prompts_leave_the_source_bit_for_bit():
    model = GaussianMixtureDenoiser.random(shape=SHAPE, components=3, seed=0, parameterization="flow")
    x0 = model.sample(2, generator=torch.Generator().manual_seed(3)).float()
    out = flow_edit(model, x0, flow_sigmas(8).float(), n_max=6, n_min=0, n_avg=2)
    assert torch.equal(out, x0)


def test_model_calls_are_two_per_noise_on_edited_steps_and_one_per_sampling_step():
    x0, a, b = _points(2)
    calls = []
    flow_edit(TwoPrompts(a, b), x0, flow_sigmas(10).float(), callback=lambda d: calls.append(d["model_calls"]),
              source_args={"branch": "source"}, n_max=6, n_min=2, n_avg=3)
    assert len(calls) == 6 and calls[-1] == 2 * 3 * 4 + 2


@pytest.mark.parametrize("shape", [SHAPE, (4, 3, 8, 8)], ids=["image", "video"])
def test_a_mask_keeps_the_source_exactly_where_it_is_zero(shape):
    x0, a, b = _points(4, shape)
    x0 = x0.expand(2, *shape).clone()
    mask = torch.zeros(2, *shape)
    mask[..., :4] = 1.0
    out = flow_edit(TwoPrompts(a, b), x0, flow_sigmas(6).float(), source_args={"branch": "source"}, n_max=5, n_min=0,
                    mask=mask)
    assert out.shape == x0.shape
    assert torch.equal(out[..., 4:], x0[..., 4:])
    assert (out[..., :4] - (x0 + b - a)[..., :4]).abs().max() < 1e-5


def test_batched_rows_equal_single_runs():
    model = GaussianMixtureDenoiser.random(shape=SHAPE, components=3, seed=0, parameterization="flow")
    target = GaussianMixtureDenoiser.random(shape=SHAPE, components=3, seed=5, parameterization="flow")
    both = lambda x, sigma, branch="target": (model if branch == "source" else target)(x, sigma)  # noqa: E731
    x0 = model.sample(2, generator=torch.Generator().manual_seed(3)).float()
    sigmas, args = flow_sigmas(6).float(), {"source_args": {"branch": "source"}, "n_max": 5, "n_min": 0, "seed": 7}
    batch = flow_edit(both, x0, sigmas, **args)
    second = flow_edit(both, x0[1:], sigmas, **{**args, "seed": 8})
    assert (batch[1:] - second).abs().max() < 1e-5


class LinearTwoPrompts(TwoPrompts):
    """D = point + x/2: the noise cancels in the velocity gap, but each step's result depends on the last one,
    so how many steps edited a pixel shows in the result."""

    def __call__(self, x, sigma, branch="target"):
        return super().__call__(x, sigma, branch) + 0.5 * x


def test_a_soft_mask_value_edits_over_that_fraction_of_the_steps():
    # m = 0.5 of 6 edited steps: the last 3 edit there, as n_max = 3 does; 1 is the full edit; 0 stays x0
    x0, a, b = _points(5)
    model, sigmas, args = LinearTwoPrompts(a, b), flow_sigmas(8).float(), {"source_args": {"branch": "source"}}
    mask = torch.zeros(1, *SHAPE)
    mask[..., :2], mask[..., 2:4] = 1.0, 0.5
    soft = flow_edit(model, x0, sigmas, n_max=6, n_min=0, mask=mask, **args)
    assert (soft[..., :2] - flow_edit(model, x0, sigmas, n_max=6, n_min=0, **args)[..., :2]).abs().max() < 1e-6
    assert (soft[..., 2:4] - flow_edit(model, x0, sigmas, n_max=3, n_min=0, **args)[..., 2:4]).abs().max() < 1e-6
    assert torch.equal(soft[..., 4:], x0[..., 4:])
    assert (soft[..., 2:4] - flow_edit(model, x0, sigmas, n_max=6, n_min=0, **args)[..., 2:4]).abs().max() > 1e-3
