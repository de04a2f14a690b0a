"""The pack's functions and its sampler plumbing on a second, strict device (tests/support/emulated_device.py).

CUDA refuses an op that mixes a device tensor with a CPU tensor of one or more dims, and Apple's MPS
has no float64; every other test runs ComfyUI with --cpu and cannot notice either. Here every input
lives on the emulated device, which raises exactly there, and computes with the CPU's kernels, so
each result must also equal the plain CPU run bit for bit. Where CUDA is present (tools/gpu_check.py),
the same runs go to the real GPU too and must agree with the CPU to -60 dB (kernels round differently).
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from inversion_ops import decoder, exact, multistep, preciseinv, rf
from tests.support.analytic import GaussianMixtureDenoiser, LinearVAE, cfg_denoiser
from tests.support.emulated_device import DEVICE, DeviceMismatch, EmulatedDevice, is_on_device
from tests.support.metrics import nmse_db
from tests.support.reference_samplers import BASE_SHOOTING_RUNS, sample_dpmpp_2m

torch.set_num_threads(1)
SHAPE = (4, 8, 8)


def mixture(parameterization, weights):
    return GaussianMixtureDenoiser.random(SHAPE, components=3, seed=0, parameterization=parameterization,
                                          weights=weights, compute_dtype=torch.float32)


def cfg_model(parameterization):
    return cfg_denoiser(mixture(parameterization, [0.6, 0.3, 0.1]), mixture(parameterization, [0.2, 0.3, 0.5]), 3.0)


EPS_UP = torch.tensor([0.0, 0.3, 1.2, 4.0, 14.6])
FLOW_UP = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
LATENT = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))


def run_both(call):
    """call(to) on CPU tensors and on the emulated device (float64 refused); returns (cpu, device) results.
    With CUDA present, also checks the run on the GPU against the CPU one."""
    reference = call(lambda t: t)
    if torch.cuda.is_available():
        on_gpu = call(lambda t: t.to("cuda"))
        assert on_gpu.device.type == "cuda", "the result left the GPU"
        assert torch.isfinite(on_gpu).all() and nmse_db(on_gpu.cpu(), reference).max() < -60
    with EmulatedDevice(float64=False):
        on_device = call(lambda t: t.to(DEVICE))
        assert is_on_device(on_device), "the result left the input's device"
        on_device = on_device.cpu()
    return reference, on_device


def test_the_guard_fails_where_cuda_and_mps_fail():
    with EmulatedDevice(float64=False):
        x = torch.ones(3).to(DEVICE)
        with pytest.raises(DeviceMismatch, match="same device"):
            x + torch.ones(3)                     # a CPU tensor with a dim: CUDA refuses
        with pytest.raises(DeviceMismatch, match="float64"):
            x.double()                           # MPS has no float64
        assert is_on_device(x * torch.tensor(2.0))   # a 0-dim CPU tensor is a scalar: allowed
        assert is_on_device(torch.zeros(3, device=x.device)) and is_on_device(x.new_ones(2))


OPS = {
    "naive": lambda m, x, s: exact.naive_inversion(m, x, s),
    "exact_euler_anderson": lambda m, x, s: exact.exact_inversion_euler(m, x, s, max_iterations=8),
    "exact_euler_fixed_point": lambda m, x, s: exact.exact_inversion_euler(m, x, s, solver="fixed_point",
                                                                            max_iterations=8),
    "exact_dpmpp_2m": lambda m, x, s: exact.exact_inversion_dpmpp_2m(m, x, s, max_iterations=4, substeps=2,
                                                                     refine_passes=2),
    "preciseinv": lambda m, x, s: preciseinv.preciseinv(m, x, s, max_iterations=4),
    "shooting_dpmpp_2m": lambda m, x, s: multistep.exact_inversion_shooting(m, x, s, sample=sample_dpmpp_2m,
                                                                            runs=BASE_SHOOTING_RUNS, max_iterations=3),
}


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
@pytest.mark.parametrize("name", list(OPS))
def test_inversion_functions_stay_on_the_device(name, parameterization):
    model, sigmas = cfg_model(parameterization), EPS_UP if parameterization == "eps" else FLOW_UP

    def call(to):
        return OPS[name](model, to(LATENT), to(sigmas))
    cpu, device = run_both(call)
    assert torch.equal(cpu, device)


RF = {
    "forward": lambda m, x, s, to: rf.controlled_forward(m, x, s, gamma=0.5, seed=1),
    "forward_sde": lambda m, x, s, to: rf.controlled_forward_sde(m, x, s, gamma=0.5, seed=1),
    "reverse": lambda m, x, s, to: rf.controlled_reverse(m, x, s.flip(0), reference=to(LATENT[:1]), stop=0.5),
    "reverse_sde": lambda m, x, s, to: rf.controlled_reverse_sde(m, x, s.flip(0), reference=to(LATENT[:1]),
                                                                 stop=0.5, seed=1),
}


@pytest.mark.parametrize("name", list(RF))
def test_rf_functions_stay_on_the_device(name):
    model = cfg_model("flow")
    cpu, device = run_both(lambda to: RF[name](model, to(LATENT), to(FLOW_UP), to))
    assert torch.equal(cpu, device)


@pytest.mark.parametrize("method", ["encoder", "forward_step", "momentum", "adam_residual", "gradient"])
def test_decoder_inversion_stays_on_the_device(method):
    vae = LinearVAE(latent_shape=(4, 4, 4), scale=4, compute_dtype=torch.float32)
    image = vae.decode(torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
    options = {} if method == "encoder" else {"max_iterations": 5}
    cpu, device = run_both(lambda to: decoder.METHODS[method](vae.encode, vae.decode, to(image), **options))
    assert torch.equal(cpu, device)


# ---------------------------------------------------------------- the node plumbing, through ComfyUI's KSAMPLER

class AnalyticGuider:
    """The analytic model in the shape ComfyUI's KSAMPLER calls a guider: __call__(x, sigma, model_options,
    seed) -> denoised, and `inner_model` with the real model_sampling and latent format of a ComfyUI model."""

    def __init__(self, denoise, model_sampling, latent_format):
        self.denoise, self.cfg = denoise, 1.0
        self.inner_model = SimpleNamespace(model_sampling=model_sampling, process_latent_in=latent_format.process_in)
        self.model_patcher = SimpleNamespace(model=self.inner_model)   # newer KSAMPLER logs its class name

    def __call__(self, x, sigma, model_options=None, seed=None):
        return self.denoise(x, sigma)


@pytest.fixture(scope="module")
def comfy_parts(comfy):
    """model_sampling and latent_format of the tiny SD1.5 (EPS) and SD3 (flow) models, loaded by ComfyUI."""
    parts = {}
    for kind, name in (("eps", "tiny_sd15_eps.safetensors"), ("flow", "tiny_sd3_flow.safetensors")):
        model = comfy.nodes.UNETLoader().load_unet(name, "default")[0]
        parts[kind] = (model.get_model_object("model_sampling"), model.get_model_object("latent_format"))
    return parts


def node_samplers(comfy, kind):
    """Every SAMPLER the pack's nodes build, as (name, sampler, ascending sigmas?)."""
    exact_nodes, pi_nodes, rf_nodes = (comfy.pack_module(f"nodes.{m}") for m in ("exact", "preciseinv", "rf"))
    samplers = [("naive", exact_nodes.inversion_sampler("euler", "naive"), True),
                ("exact_euler", exact_nodes.inversion_sampler("euler", max_iterations=8), True),
                ("exact_dpmpp_2m", exact_nodes.inversion_sampler("dpmpp_2m", max_iterations=4), True),
                ("exact_heun", exact_nodes.inversion_sampler("heun", max_iterations=4), True),
                ("exact_dpmpp_2m_backward_euler", exact_nodes.inversion_sampler("dpmpp_2m_backward_euler",
                                                                                max_iterations=4), True),
                ("shooting_lms", exact_nodes.inversion_sampler("lms", max_iterations=3), True),
                ("preciseinv", pi_nodes.preciseinv_sampler(1e-3, 4), True)]
    if kind == "flow":
        samplers += [("rf_forward", rf_nodes.ControlledFlowSampler("forward", seed=1, gamma=0.5), True),
                     ("rf_reverse", rf_nodes.ControlledFlowSampler("reverse", reference=LATENT[:1], stop=0.5), False)]
    return samplers


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_node_samplers_run_on_the_device_through_comfyui_ksampler(comfy, comfy_parts, kind):
    model_sampling, latent_format = comfy_parts[kind]
    sigmas = EPS_UP if kind == "eps" else FLOW_UP
    for name, sampler, ascending in node_samplers(comfy, kind):
        def call(to):
            # ComfyUI moves the model (model_sampling's buffers too) and the schedule to the model's device
            sampling = copy.deepcopy(model_sampling).to(to(sigmas).device)
            guider = AnalyticGuider(cfg_model(kind), sampling, latent_format)
            steps = []
            out = sampler.sample(guider, to(sigmas if ascending else sigmas.flip(0)), {"model_options": {}},
                                 lambda i, denoised, x, total: steps.append(i), to(torch.zeros_like(LATENT)),
                                 latent_image=to(LATENT))
            # one progress bar: the reports count up from 0 without restarting (refine passes and shooting
            # iterations included), at least one per step
            assert steps == list(range(len(steps))) and len(steps) >= len(sigmas) - 1, f"{name}: steps {steps}"
            return out
        cpu, device = run_both(call)
        assert torch.equal(cpu, device), name
