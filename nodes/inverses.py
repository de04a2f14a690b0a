"""Which inverse each ComfyUI sampler takes, and which runs shooting makes: the pack's one table.

Backward Euler (Hong et al., CVPR 2024) inverts a sampler step by step where its step from sigma to
sigma_next stands alone; every other deterministic sampler is inverted by shooting through ComfyUI's own
sampling function, used as a black box. Nothing here names a model family.
"""
import functools

import comfy.model_patcher
import comfy.samplers

from ..inversion_ops import exact, multistep
from ..inversion_ops.multistep import ShootingRun


# ---------------------------------------------------------------- ComfyUI's own sampler code, as black boxes

def comfy_sampler_function(name):
    """ComfyUI's own sampling function for `name`, with the options its KSAMPLER carries."""
    sampler = comfy.samplers.sampler_object(name)
    return functools.partial(sampler.sampler_function, **sampler.extra_options)


def comfy_one_step(name):
    """One step of ComfyUI's sampler `name` over the two-sigma schedule it is given (heun and dpm_2 step
    from sigma to sigma_next with nothing else of the schedule)."""
    sample = comfy_sampler_function(name)

    def step(model, x, sigmas, extra_args):
        return sample(model, x, sigmas, extra_args=extra_args, disable=True)
    step.__name__ = f"one_step_{name}"
    return step


def comfy_guided_and_uncond(model, x, sigma, extra_args):
    """(guided, unconditional) prediction from one call of ComfyUI's CFG model; a post-CFG hook keeps the
    unconditional one, as ComfyUI's own cfg_pp samplers do (on a copy of model_options)."""
    kept = {}

    def keep_uncond(args):
        kept["uncond"] = args["uncond_denoised"]
        return args["denoised"]
    options = comfy.model_patcher.set_model_options_post_cfg_function(
        dict(extra_args.get("model_options", {})), keep_uncond, disable_cfg1_optimization=True)
    return model(x, sigma, model_options=options), kept["uncond"]


def backward_euler_through_own_step(name):
    """Backward Euler per step through ComfyUI's own one-step code for `name`."""
    return functools.partial(exact.exact_inversion_one_step, step=comfy_one_step(name))


def shooting(name, runs):
    """Shooting through ComfyUI's whole sampling function for `name`, making `runs` in order."""
    return functools.partial(multistep.exact_inversion_shooting, sample=comfy_sampler_function(name), runs=runs)


# ---------------------------------------------------------------- the runs shooting makes, in order
# Each run goes on only with the samples the runs before it left above RETRY_ABOVE (see docs/results.md#shooting-runs)

SHOOTING_RUNS = (
    # from the exact euler inversion: lands in the latent's basin for most samplers
    ShootingRun(exact.naive_inversion, exact.exact_inversion_euler),
    # from the naive inversion N(x): some high-order samplers settle far from x from the euler start
    ShootingRun(exact.naive_inversion, None),
    # from heun's and dpm_2's exact inversions: both starts above can lead to another basin
    ShootingRun(exact.naive_inversion, backward_euler_through_own_step("heun")),
    ShootingRun(exact.naive_inversion, backward_euler_through_own_step("dpm_2")),
)

# CFG++ renoises with the unconditional prediction: its own naive inversion first (docs/results.md#cfg-pp-shooting-runs)
CFG_PP_SHOOTING_RUNS = (
    ShootingRun(functools.partial(exact.naive_inversion_cfg_pp, guided_and_uncond=comfy_guided_and_uncond),
                backward_euler_through_own_step("euler_cfg_pp")),
    *SHOOTING_RUNS,
)


# ---------------------------------------------------------------- which inverse each ComfyUI sampler takes

# Shot through their own function: ComfyUI's deterministic samplers but euler / ddim, heun and dpm_2.
SHOT_SAMPLERS = ("dpmpp_2m", "lms", "deis", "ipndm", "ipndm_v", "uni_pc", "uni_pc_bh2", "res_multistep",
                 "gradient_estimation", "heunpp2", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp",
                 "gradient_estimation_cfg_pp", "euler_cfg_pp")

# The inversion functions, by the name the Exact Inversion Sampler offers.
EXACT_INVERSIONS = {
    "euler": exact.exact_inversion_euler,                        # the paper's backward Euler
    "heun": backward_euler_through_own_step("heun"),             # their step from sigma to sigma_next
    "dpm_2": backward_euler_through_own_step("dpm_2"),           # stands alone
    **{name: shooting(name, CFG_PP_SHOOTING_RUNS if name.endswith("_cfg_pp") else SHOOTING_RUNS)
       for name in SHOT_SAMPLERS},
    "dpmpp_2m_backward_euler": exact.exact_inversion_dpmpp_2m,   # the paper's dpmpp_2m algorithm
}

# ComfyUI sampler name -> its key in EXACT_INVERSIONS; ComfyUI's "ddim" runs sample_euler.
INVERSE_OF = {"euler": "euler", "ddim": "euler", "heun": "heun", "dpm_2": "dpm_2",
              **{name: name for name in SHOT_SAMPLERS}}
INVERTIBLE_SAMPLERS = tuple(INVERSE_OF)

# Refused with the reason that they draw fresh noise at every step (as is every "ancestral" or "sde" name).
STOCHASTIC_SAMPLERS = ("ddpm", "lcm", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece")


def check_invertible_sampler(sampler_name):
    """The inverse to use for a ComfyUI sampler name (INVERSE_OF); refuse the rest, saying why."""
    if sampler_name in INVERSE_OF:
        return INVERSE_OF[sampler_name]
    stochastic = "ancestral" in sampler_name or "sde" in sampler_name or sampler_name in STOCHASTIC_SAMPLERS
    why = ("it adds fresh random noise at every step, so no single starting latent reproduces an image"
           if stochastic else "this pack has no exact inverse for its update")
    raise ValueError(f"sampler_name {sampler_name!r} cannot be inverted: {why}. "
                     f"Use one of {', '.join(INVERTIBLE_SAMPLERS)} for both inversion and regeneration.")
