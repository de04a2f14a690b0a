"""Decoder inversion on analytic models (no ComfyUI).

The test model: D(z) = A z + b (LinearVAE) and a *perturbed* encoder E'(x) = M pinv(A)(x - b) with
M = I + 0.05 P, P a fixed random matrix. E' is then only approximately the left-inverse of D, so the
encoder alone is off by about 5% and the answer has to come from the iteration. For x = D(z*):
T(z) = E'(D(z)) - E'(x) = M (z - z*), whose only zero is z*, and forward steps contract by the
spectral radius of (I - rho M) ~ 1 - rho each step, so 1e-5 relative error is reached in tens of
iterations (fp32 rounding of the latent sits near 1e-7 relative, far below).
"""
import pytest
import torch

from tests.support.analytic import LinearVAE
from inversion_ops.common import per_sample_rms
from inversion_ops.decoder import (
    check_inertial_km, inertial_km_max_rho, invert_adam_residual, invert_encoder, invert_forward_step,
    invert_gradient, invert_momentum,
)

LATENT = (4, 4, 4)


def perturbed_linear_vae(eps=0.05, seed=0):
    vae = LinearVAE(latent_shape=LATENT, scale=8, seed=seed)
    n = vae.A.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.eye(n, dtype=torch.float64) + eps * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5

    def encode(x):
        z = vae.encode(x)
        return (z.flatten(1).to(torch.float64) @ m.T).view(z.shape).to(x.dtype)

    return vae, encode


def ground_truth(vae, n=1, seed=2, scales=None):
    z = torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(seed))
    if scales is not None:
        z = z * torch.tensor(scales).view(-1, 1, 1, 1)
    return z, vae.decode(z)


def rel_err(z, z_true):
    return ((z.double() - z_true.double()).flatten(1).norm(dim=1) / z_true.double().flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("method", [invert_forward_step, invert_momentum])
def test_gradient_free_methods_recover_linear_decoder_exactly(method):
    vae, encode = perturbed_linear_vae()
    z_true, x = ground_truth(vae, n=2)
    z_enc, _ = invert_encoder(encode, vae.decode, x)
    assert rel_err(z_enc, z_true) > 1e-2          # the perturbed encoder alone is far off
    z, info = method(encode, vae.decode, x, iters=80, tol=0.0)
    assert rel_err(z, z_true) < 1e-5
    assert info.model_calls == 1 + 2 * 81


@pytest.mark.parametrize("method", [invert_forward_step, invert_momentum, invert_adam_residual, invert_gradient])
def test_batch_of_three_equals_three_single_runs(method):
    # Different scales make the absolute tolerance stop each sample at a different iteration.
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=3, scales=[0.1, 1.0, 10.0])
    # Adam moves each element by about lr per step whatever its scale, so it gets a looser tolerance.
    tol = {invert_adam_residual: 1e-2, invert_gradient: 1e-2}.get(method, 1e-4)
    kw = dict(iters=40, tol=tol)
    z, info = method(encode, vae.decode, x, **kw)
    singles = [method(encode, vae.decode, x[i:i + 1], **kw) for i in range(3)]
    for i, (z_i, info_i) in enumerate(singles):
        torch.testing.assert_close(z[i:i + 1], z_i, rtol=1e-6, atol=1e-7)
        assert info.sample_iterations[i] == info_i.sample_iterations[0]
        assert info.best_iteration[i] == info_i.best_iteration[0]
        assert [r[i] for r in info.residuals[:len(info_i.residuals)]] == pytest.approx(
            [r[0] for r in info_i.residuals], rel=1e-5)
    assert len(set(info.sample_iterations)) > 1, "samples should stop at different iterations"


def test_converged_samples_keep_their_value_and_stop_calling_the_model():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=3, scales=[0.1, 1.0, 10.0])
    rows = []
    _, info = invert_forward_step(lambda t: (rows.append(t.shape[0]), encode(t))[1], vae.decode, x, iters=40, tol=1e-4)
    assert all(info.converged)
    assert rows[0] == 3 and rows[-1] == 1        # stopped samples leave the batch
    assert info.residuals[-1][0] == info.residuals[info.sample_iterations[0]][0]


@pytest.mark.parametrize("alpha, rho", [(1.0, 0.5), (-0.1, 0.5), (0.3, 0.0), (0.3, 1.2), (0.6, 0.5)])
def test_momentum_rejects_parameters_outside_theorem_2(alpha, rho):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae)
    with pytest.raises(ValueError, match="alpha|rho"):
        invert_momentum(encode, vae.decode, x, alpha=alpha, rho=rho)


def test_momentum_condition_matches_theorem_2():
    # lambda*(1 - alpha + 2 alpha^2) < (1 - alpha)^2 with lambda = rho / (2 beta)
    assert inertial_km_max_rho(0.3) == pytest.approx(2 * 0.49 / 0.88)
    assert inertial_km_max_rho(0.0, beta=0.7) == pytest.approx(1.4)   # Theorem 1: rho < 2 beta
    check_inertial_km(0.3, 0.5)                                        # the defaults pass
    check_inertial_km(0.3, 1.0)                                        # the note's alpha 0.3 / rho 1 passes at beta 1
    with pytest.raises(ValueError):
        check_inertial_km(0.3, 1.0, beta=0.8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", [invert_encoder, invert_forward_step, invert_momentum, invert_adam_residual,
                                    invert_gradient])
def test_latent_stays_in_requested_dtype(method, dtype):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    seen = []

    def decode(z):
        seen.append(z.dtype)
        return vae.decode(z)

    iterates = []
    z, info = method(encode, decode, x, dtype=dtype, callback=lambda d: iterates.append(d["z"].dtype),
                     **({} if method is invert_encoder else dict(iters=3)))
    assert z.dtype == dtype and info.z_last.dtype == dtype
    assert set(seen) == {dtype} and set(iterates) == {dtype}
    assert torch.isfinite(z).all()


def test_gradient_method_leaves_weights_alone():
    torch.manual_seed(0)
    dec = torch.nn.Linear(8, 24)
    enc = torch.nn.Linear(24, 8)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    x = dec(torch.randn(2, 8)).detach()
    with torch.inference_mode():                 # as ComfyUI runs nodes
        z, info = invert_gradient(lambda t: frozen(enc(t)), dec, x, iters=5)
    assert all(p.grad is None for m in (dec, enc, frozen) for p in m.parameters())
    assert all(p.requires_grad for m in (dec, enc) for p in m.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not z.requires_grad and info.model_calls == 1 + 6


def test_returned_latent_is_the_lowest_residual_iterate():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    z, info = invert_adam_residual(encode, vae.decode, x, iters=30, tol=0.0)
    r = per_sample_rms(encode(vae.decode(z)) - encode(x))
    best = torch.tensor([min(h[i] for h in info.residuals) for i in range(2)])
    torch.testing.assert_close(r, best, rtol=1e-4, atol=1e-7)
    assert info.best_residual == pytest.approx(best.tolist())


def test_callback_sees_every_evaluation_and_can_interrupt():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae)
    seen = []

    def callback(d):
        seen.append(d["i"])
        if d["i"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_momentum(encode, vae.decode, x, iters=50, tol=0.0, callback=callback)
    assert seen == [0, 1, 2, 3, 4]
