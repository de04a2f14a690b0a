"""Decoder inversion on analytic models (no ComfyUI).

The test model: D(z) = A z + b (LinearVAE) and a *perturbed* encoder E'(x) = M pinv(A)(x - b) with
M = I + 0.05 P, P a fixed random matrix. E' is then only approximately the left-inverse of D, so the
encoder alone is off by about 5% and the answer has to come from the iteration. For x = D(z*):
T(z) = E'(D(z)) - E'(x) = M (z - z*), whose only zero is z*, and forward steps contract by the
spectral radius of (I - rho M) ~ 1 - rho each step, so 1e-5 relative error is reached in tens of
iterations (fp32 rounding of the latent sits near 1e-7 relative, far below).
"""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from inversion_ops.common import StepLog, per_sample_rms
from inversion_ops.decoder import (
    DEFAULT_STEP, METHODS, auto_momentum_step, check_inertial_km, checkpointed, inertial_km_max_rho,
    invert_adam_residual, invert_encoder, invert_forward_step, invert_gradient, invert_hybrid, invert_momentum,
)
from tests.support.analytic import LinearVAE
from tests.support.emulated_device import DEVICE, EmulatedDevice

LATENT = (4, 4, 4)
ITERATIVE = [invert_forward_step, invert_momentum, invert_adam_residual, invert_gradient]
DEVICES = ["emulated", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
FIELDS = ("residual", "best_residual", "iterations", "best_iteration", "hit_cap", "active")


def perturbed_linear_vae(eps=0.05, seed=0, device="cpu"):
    vae = LinearVAE(latent_shape=LATENT, scale=8, seed=seed)
    n = vae.A.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.eye(n, dtype=torch.float64) + eps * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    m = m.to(device)

    def encode(x):
        z = vae.encode(x)
        return (z.flatten(1).to(torch.float64) @ m.T).view(z.shape).to(x.dtype)

    return vae, encode


def ground_truth(vae, n=1, seed=2, scales=None, device="cpu"):
    z = torch.randn(n, *LATENT, generator=torch.Generator().manual_seed(seed))
    if scales is not None:
        z = z * torch.tensor(scales).view(-1, 1, 1, 1)
    z = z.to(device)
    return z, vae.decode(z)


def rel_err(z, z_true):
    return ((z.double() - z_true.double()).flatten(1).norm(dim=1) / z_true.double().flatten(1).norm(dim=1)).max().item()


def run(method, *args, **options):
    """(z, StepLog) of one inversion, the log recording every callback dict."""
    log = StepLog()
    z = method(*args, callback=log, **options)
    return z, log


def last(log, key):
    return log.records[-1][key]


@pytest.mark.parametrize("method", [invert_forward_step, invert_momentum])
def test_gradient_free_methods_recover_linear_decoder_exactly(method):
    vae, encode = perturbed_linear_vae()
    z_true, x = ground_truth(vae, n=2)
    z_enc = invert_encoder(encode, vae.decode, x)
    assert rel_err(z_enc, z_true) > 1e-2          # the perturbed encoder alone is far off
    z, log = run(method, encode, vae.decode, x, max_iterations=80, tolerance=0.0)
    assert rel_err(z, z_true) < 1e-5
    assert log.model_calls == 1 + 2 * 81 and len(log.records) == 81
    assert last(log, "iterations") == [80, 80] and last(log, "hit_cap") == [True, True]


@pytest.mark.parametrize("method", ITERATIVE)
def test_batch_of_three_equals_three_single_runs(method):
    # Different scales make the absolute tolerance stop each sample at a different iteration.
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=3, scales=[0.1, 1.0, 10.0])
    # Adam moves each element by about lr per step whatever its scale, so it gets a looser tolerance.
    tolerance = {invert_adam_residual: 1e-2, invert_gradient: 1e-2}.get(method, 1e-4)
    kw = dict(max_iterations=40, tolerance=tolerance)
    z, log = run(method, encode, vae.decode, x, **kw)
    for i in range(3):
        z_i, log_i = run(method, encode, vae.decode, x[i:i + 1], **kw)
        torch.testing.assert_close(z[i:i + 1], z_i, rtol=1e-6, atol=1e-7)
        for key in ("iterations", "best_iteration", "hit_cap"):
            assert last(log, key)[i] == last(log_i, key)[0], key
        assert last(log, "best_residual")[i] == pytest.approx(last(log_i, "best_residual")[0], rel=1e-5)
        assert [r[i] for r in log.residuals[:len(log_i.residuals)]] == pytest.approx(
            [r[0] for r in log_i.residuals], rel=1e-5)
    assert len(set(last(log, "iterations"))) > 1, "samples should stop at different iterations"


def test_converged_samples_keep_their_value_and_stop_calling_the_model():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=3, scales=[0.1, 1.0, 10.0])
    rows = []
    z, log = run(invert_forward_step, lambda t: (rows.append(t.shape[0]), encode(t))[1], vae.decode, x,
                 max_iterations=40, tolerance=1e-4)
    assert not any(last(log, "hit_cap")) and not any(last(log, "active"))
    assert rows[0] == 3 and rows[-1] == 1        # stopped samples leave the batch
    stop = last(log, "iterations")[0]
    assert log.residuals[-1][0] == log.residuals[stop][0]
    assert all(r["active"][0] for r in log.records[:stop]) and not any(r["active"][0] for r in log.records[stop:])
    assert max(last(log, "residual")) <= 1e-4


def test_callback_reports_every_field_per_sample_on_the_input_device():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    seen = []
    invert_momentum(encode, vae.decode, x, max_iterations=5, tolerance=0.0, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert [d["model_calls"] for d in seen] == [1 + 2 * (k + 1) for k in range(6)]
    for d in seen:
        assert d["x"].shape == x.shape[:1] + LATENT and d["x"].dtype == torch.float32
        assert all(d[k].shape == (2,) and d[k].device == x.device for k in FIELDS)
        assert d["hit_cap"].dtype == d["active"].dtype == torch.bool
        assert (d["best_residual"] <= d["residual"]).all()
    assert seen[-1]["iterations"].tolist() == [5, 5] and not seen[-1]["active"].any()


@pytest.mark.parametrize("alpha, rho", [(1.0, 0.5), (-0.1, 0.5), (0.3, 0.0), (0.3, 1.2), (0.6, 0.5)])
def test_momentum_rejects_parameters_outside_theorem_2(alpha, rho):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae)
    with pytest.raises(ValueError, match="alpha|rho"):
        invert_momentum(encode, vae.decode, x, alpha=alpha, rho=rho)


@pytest.mark.parametrize("options, name", [(dict(max_iterations=-1), "max_iterations"),
                                           (dict(max_iterations=2.5), "max_iterations"),
                                           (dict(tolerance=-1e-4), "tolerance"),
                                           (dict(patience=0), "patience"),
                                           (dict(rho=0.0), "rho")])
def test_bad_options_are_refused_naming_the_option(options, name):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae)
    with pytest.raises(ValueError, match=name):
        invert_forward_step(encode, vae.decode, x, **options)


def test_momentum_condition_matches_theorem_2():
    # lambda*(1 - alpha + 2 alpha^2) < (1 - alpha)^2 with lambda = rho / (2 beta)
    assert inertial_km_max_rho(0.3) == pytest.approx(2 * 0.49 / 0.88)
    assert inertial_km_max_rho(0.0, beta=0.7) == pytest.approx(1.4)   # Theorem 1: rho < 2 beta
    check_inertial_km(0.3, 0.5)                                        # the defaults pass
    check_inertial_km(0.3, 1.0)                                        # the note's alpha 0.3 / rho 1 passes at beta 1
    with pytest.raises(ValueError):
        check_inertial_km(0.3, 1.0, beta=0.8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", [invert_encoder, *ITERATIVE])
def test_model_runs_in_dtype_while_the_latent_stays_float32(method, dtype):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    seen = []

    def decode(z):
        seen.append(z.dtype)
        return vae.decode(z)

    iterates = []
    z = method(encode, decode, x, dtype=dtype, callback=lambda d: iterates.append(d["x"].dtype),
               **({} if method is invert_encoder else dict(max_iterations=3)))
    assert z.dtype == torch.float32
    assert set(seen) == {dtype} and set(iterates) == {torch.float32}
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("method", [invert_forward_step, invert_momentum])
def test_16_bit_model_converges_to_its_rounding_floor(method):
    """With a float32 iterate, updates below a 16-bit ulp of z still accumulate, so the error ends at
    the model's own rounding. Measured after 80 iterations: fp16 3.3e-4 / 3.4e-4 relative, bf16
    2.2e-3 / 2.2e-3 (forward_step / momentum); an fp16 / bf16 iterate stalled at 5.6e-4 / 4.2e-4 and
    4.3e-3 / 3.5e-3."""
    vae, encode = perturbed_linear_vae()
    z_true, x = ground_truth(vae, n=2)
    for dtype, floor in [(torch.float16, 1e-3), (torch.bfloat16, 3e-3)]:
        z = method(encode, vae.decode, x, max_iterations=80, tolerance=0.0, dtype=dtype)
        assert rel_err(z, z_true) < floor, dtype
    assert rel_err(invert_encoder(encode, vae.decode, x, dtype=torch.float16), z_true) > 1e-2


def test_gradient_method_leaves_weights_alone():
    torch.manual_seed(0)
    dec = torch.nn.Linear(8, 24)
    enc = torch.nn.Linear(24, 8)
    frozen = torch.nn.Linear(8, 8).requires_grad_(False)
    x = dec(torch.randn(2, 8)).detach()
    with torch.inference_mode():                 # as ComfyUI runs nodes
        z, log = run(invert_gradient, lambda t: frozen(enc(t)), dec, x, max_iterations=5)
    assert all(p.grad is None for m in (dec, enc, frozen) for p in m.parameters())
    assert all(p.requires_grad for m in (dec, enc) for p in m.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not z.requires_grad
    assert log.model_calls == 1 + 6 and log.model_calls_backward == 5   # E(x), 6 decodes, 5 backward


def test_returned_latent_is_the_lowest_residual_iterate():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    z, log = run(invert_adam_residual, encode, vae.decode, x, max_iterations=30, tolerance=0.0)
    r = per_sample_rms(encode(vae.decode(z)) - encode(x))
    best = torch.tensor([min(h[i] for h in log.residuals) for i in range(2)])
    torch.testing.assert_close(r, best, rtol=1e-4, atol=1e-7)
    assert last(log, "best_residual") == pytest.approx(best.tolist())
    assert [log.residuals[k][i] for i, k in enumerate(last(log, "best_iteration"))] == pytest.approx(best.tolist())


def test_patience_stops_a_diverging_sample_and_keeps_its_best():
    # rho = 2.5 > 2 beta: the forward step diverges, so E(x) (evaluation 0) stays the best.
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    z, log = run(invert_forward_step, encode, vae.decode, x, rho=2.5, max_iterations=50, patience=3)
    assert len(log.records) == 4 and last(log, "iterations") == [3, 3]
    assert last(log, "best_iteration") == [0, 0] and last(log, "hit_cap") == [True, True]
    torch.testing.assert_close(z, invert_encoder(encode, vae.decode, x))


def test_callback_sees_every_evaluation_and_can_interrupt():
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae)
    seen = []

    def callback(d):
        seen.append(d["i"])
        if d["i"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_momentum(encode, vae.decode, x, max_iterations=50, tolerance=0.0, callback=callback)
    assert seen == [0, 1, 2, 3, 4]


class HostSyncs(TorchFunctionMode):
    """Counts the tensor operations that wait for the device (on CUDA they would block the host)."""
    SYNCS = {"item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.SYNCS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", [invert_encoder, *ITERATIVE])
def test_at_most_one_host_sync_per_iteration(method):
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=3, scales=[0.1, 1.0, 10.0])
    evaluations = []
    options = {} if method is invert_encoder else dict(max_iterations=12, tolerance=1e-3)
    with HostSyncs() as syncs:
        method(encode, vae.decode, x, callback=lambda d: evaluations.append(d["i"]), **options)
    assert syncs.count <= len(evaluations) + 1, (syncs.count, len(evaluations))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_tensor_stays_on_the_input_device(name, device):
    """On the emulated strict device (tests/support/emulated_device.py) any op mixing a device tensor
    with a CPU one raises, as on CUDA; its kernels are the CPU's, so the result equals a CPU run."""
    strict = device == "emulated"
    target = DEVICE if strict else torch.device(device)
    options = {} if name == "encoder" else dict(max_iterations=3)
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    on_cpu = METHODS[name](encode, vae.decode, x, **options)
    with EmulatedDevice() if strict else contextlib.nullcontext():
        vae, encode = perturbed_linear_vae(device=target)
        _, x = ground_truth(vae, n=2, device=target)
        calls = []

        def decode(z):
            calls.append(z.device)
            return vae.decode(z)

        def check(d):
            assert all(d[k].device == x.device for k in (*FIELDS, "x"))

        z = METHODS[name](encode, decode, x, callback=check, **options)
        assert z.device == x.device and set(calls) == {x.device}
        z = z.cpu()
    if strict:
        assert torch.equal(z, on_cpu)
    else:
        torch.testing.assert_close(z, on_cpu, rtol=1e-4, atol=1e-5)


def test_auto_momentum_step_satisfies_theorem_2_for_every_widget_momentum():
    # the node's momentum widget spans [0, 0.99] in steps of 0.01; step_size 0 must run at every one
    for k in range(100):
        alpha = k / 100
        rho = auto_momentum_step(alpha)
        check_inertial_km(alpha, rho)
        assert 0 < rho <= DEFAULT_STEP["momentum"]
    assert auto_momentum_step(0.3) == DEFAULT_STEP["momentum"]     # the default pair keeps the paper's step


def test_hybrid_finish_lowers_the_pixel_error_below_the_fixed_point():
    # a rank-deficient view: the encoder sees only half of the pixels, so E(D(z)) = E(x) leaves the other
    # half's error, which only the pixel finish (the decoder's VJP) can see
    vae, encode = perturbed_linear_vae()
    z_true, x = ground_truth(vae, n=2)
    half = torch.ones_like(x)
    half[:, x.shape[1] // 2:] = 0

    def blind_encode(image):
        return encode(image * half)
    fixed, _ = run(invert_forward_step, blind_encode, vae.decode, x, max_iterations=5, tolerance=0.0)
    z, log = run(invert_hybrid, blind_encode, vae.decode, x, max_iterations=40, fixed_point_iterations=5)
    pixel = lambda zz: per_sample_rms(vae.decode(zz) - x).max().item()   # noqa: E731
    assert pixel(z) < 0.5 * pixel(fixed)
    assert [d["i"] for d in log.records] == list(range(len(log.records)))    # one count over both phases
    calls = [d["model_calls"] for d in log.records]
    assert calls == sorted(calls) and log.model_calls_backward == 35


def test_hybrid_finish_runs_through_the_decoder_it_is_given():
    # the node hands hybrid a cheaper copy of the decoder (bf16) for the finish: the fixed-point phase keeps the
    # float32 decoder, only the finish's evaluations go through the copy, and the latent stays float32
    vae, encode = perturbed_linear_vae()
    _, x = ground_truth(vae, n=2)
    seen = []

    def finish_decode(z):
        seen.append(z.dtype)
        return vae.decode(z.float())
    z = invert_hybrid(encode, vae.decode, x, max_iterations=12, fixed_point_iterations=5,
                      finish_decode=finish_decode, finish_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] * 8 and z.dtype == torch.float32   # 7 updates + the last evaluation


def test_checkpointed_copy_gives_the_same_gradient_and_leaves_the_module_alone():
    class Shifted(torch.nn.Sequential):          # a Sequential subclass with its own forward, as TAESD's
        def forward(self, x):
            return super().forward(x + 1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), Shifted(*[torch.nn.Linear(4, 4) for _ in range(9)]))
    net.requires_grad_(False)
    copy = checkpointed(net)
    z = torch.randn(3, 4)
    grads = []
    for module in (net, copy):
        zz = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(module(zz).pow(2).sum(), zz)[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert len(net[1]) == 9 and len(copy[1]) == 3 and type(copy[1]) is Shifted
