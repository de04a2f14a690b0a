"""ComfyUI's deterministic samplers re-written in the pack's own arithmetic, for tests and benchmarks
that need a sampler without ComfyUI (a test checks them bit for bit against ComfyUI's own), and the
shooting runs that need no ComfyUI code."""
from inversion_ops.common import CountedModel, euler_step
from inversion_ops.exact import dpmpp_2m_step, exact_inversion_euler, naive_inversion
from inversion_ops.multistep import ShootingRun

# the first two of the registry's runs (nodes/inverses.py; a test keeps them equal): the euler start, then N(x)
BASE_SHOOTING_RUNS = (ShootingRun(naive_inversion, exact_inversion_euler), ShootingRun(naive_inversion, None))


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI's `sample_euler` / `ddim` without churn (Karras et al. 2022, Algorithm 2)."""
    model = CountedModel(model, extra_args)
    for i in range(len(sigmas) - 1):
        x = euler_step(x, model(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI's `sample_dpmpp_2m` (DPM-Solver++(2M), Lu et al. 2022)."""
    model, old_denoised = CountedModel(model, extra_args), None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_prev = sigmas[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old_denoised, sigma_prev, sigmas[i], sigmas[i + 1])
        old_denoised = denoised
    return x
