"""The per-sample helpers every iterative method shares (inversion_ops.solvers): SampleTracker and adam_step."""
import math

import torch

from inversion_ops.common import append_dims
from inversion_ops.solvers import SampleTracker, adam_step


def test_tracker_keeps_each_samples_best_iterate_and_counts_only_masked_updates():
    x0 = torch.zeros(2, 3)
    track = SampleTracker(x0, torch.tensor([1.0, 1.0]))
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    better = track.update(x0 + 1, torch.tensor([0.5, 2.0]), both)
    assert better.tolist() == [True, False] and track.best_residual.tolist() == [0.5, 1.0]
    assert torch.equal(track.best_x, torch.stack([x0[0] + 1, x0[1]]))
    track.update(x0 + 2, torch.tensor([0.25, 0.25]), first)          # sample 1 is not scored here
    assert track.best_residual.tolist() == [0.25, 1.0] and track.iterations.tolist() == [2, 1]


def test_tracker_without_a_first_residual_scores_the_start_as_no_iteration():
    track = SampleTracker(torch.zeros(2, 3))
    assert track.best_residual.tolist() == [math.inf, math.inf]
    mask = torch.tensor([True, True])
    track.update(torch.ones(2, 3), torch.tensor([1.0, float("nan")]), mask)
    assert track.iterations.tolist() == [0, 0] and track.best_residual[0] == 1.0
    assert track.stale.tolist() == [0, 1]                          # a NaN residual is no gain
    track.update(torch.ones(2, 3), torch.tensor([0.5, 0.5]), mask)
    assert track.iterations.tolist() == [1, 1]


def test_tracker_counts_stale_updates_until_the_best_falls_by_the_threshold():
    track = SampleTracker(torch.zeros(1, 1), torch.tensor([1.0]), threshold=0.1)
    mask = torch.tensor([True])
    for residual, stale in ((0.95, 1), (0.92, 2), (0.85, 0), (0.80, 1)):
        track.update(torch.zeros(1, 1), torch.tensor([residual]), mask)
        assert track.stale.tolist() == [stale]
    assert track.keep(torch.tensor([False])).tolist() == [False]
    assert track.keep(torch.tensor([True])).tolist() == [False]    # a stopped sample stays stopped


def test_adam_step_with_per_sample_t_and_lr_equals_one_call_per_sample():
    g = torch.Generator().manual_seed(0)
    x, grad, m, v = (torch.randn(2, 3, 4, generator=g) for _ in range(4))
    v = v.abs()
    t, lr = torch.tensor([1.0, 5.0]), torch.tensor([0.1, 0.01])
    batched = adam_step(x, grad, m, v, append_dims(t, x), append_dims(lr, x), eps=1e-12)
    for b in range(2):
        single = adam_step(x[b:b + 1], grad[b:b + 1], m[b:b + 1], v[b:b + 1], append_dims(t[b:b + 1], x[:1]),
                           append_dims(lr[b:b + 1], x[:1]), eps=1e-12)
        for batched_part, single_part in zip(batched, single):
            assert torch.equal(batched_part[b:b + 1], single_part)
