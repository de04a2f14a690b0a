"""Exact inversion of ComfyUI's euler / ddim and dpmpp_2m samplers by backward Euler
(Hong et al., CVPR 2024), plus the naive (FlipSigmas + euler) baseline, as SAMPLERs and as one
"Invert Latent" node. The maths is in inversion_ops.exact; the ComfyUI plumbing
(guider, flow sigma = 1 handling, InvertedNoise) in nodes/sampling.py.
"""
import functools

import comfy.model_patcher
import comfy.samplers
from comfy_api.latest import io

from ..inversion_ops import exact, multistep
from ..inversion_ops.common import StepLog
from ..inversion_ops.solvers import SOLVERS
from .sampling import (CATEGORY, SHOT_SAMPLERS, InversionKSampler, InvertedNoise as InvertedNoiseObject, check_invertible_sampler,
                       check_latent_channels, invert_whole_latent, inversion_node_inputs, round_trip_recipe)
from .sigmas import inversion_sigmas
from .ui import convergence_ui, schema


def comfy_sampler_function(name):
    """ComfyUI's own sampling function for `name`, with the options its KSAMPLER carries: the black
    box that exact_inversion_shooting inverts."""
    sampler = comfy.samplers.sampler_object(name)
    return functools.partial(sampler.sampler_function, **sampler.extra_options)


def comfy_one_step(name):
    """One step of ComfyUI's own sampler `name`, run over the two-sigma schedule it is given: the
    black-box step that exact_inversion_one_step inverts (heun and dpm_2 step from sigma to
    sigma_next with nothing else of the schedule)."""
    sample = comfy_sampler_function(name)

    def step(model, x, sigmas, extra_args):
        return sample(model, x, sigmas, extra_args=extra_args, disable=True)
    step.__name__ = f"one_step_{name}"
    return step


def comfy_guided_and_uncond(model, x, sigma, extra_args):
    """(guided, unconditional) prediction from one call of ComfyUI's CFG model, the unconditional one
    kept by a post-CFG hook as ComfyUI's own cfg_pp samplers keep it (on a copy of model_options)."""
    kept = {}

    def keep_uncond(args):
        kept["uncond"] = args["uncond_denoised"]
        return args["denoised"]
    options = comfy.model_patcher.set_model_options_post_cfg_function(
        dict(extra_args.get("model_options", {})), keep_uncond, disable_cfg1_optimization=True)
    return model(x, sigma, model_options=options), kept["uncond"]


def _own_step_backward_euler(name):
    return functools.partial(exact.exact_inversion_one_step, step=comfy_one_step(name))


# Shooting's runs for every sampler: multistep.RUNS (from the exact euler inversion, then from N(x)), then
# from the exact heun and dpm_2 inversions. At 10-20 steps and cfg >= 5 on the analytic mixture some high-order
# samplers send both of the first starts to another mixture component than the latent's
# (tools/shooting_basins.py); the second-order samplers' inversions lie nearer their trajectories (res_multistep,
# EPS, 10 steps, cfg 5: +2.1 dB from the first two starts, -83.6 dB from heun's).
RUNS = (*multistep.RUNS, *(multistep.ShootingRun(exact.naive_inversion, _own_step_backward_euler(name))
                           for name in ("heun", "dpm_2")))


def _shooting(name):
    runs = RUNS
    if name.endswith("_cfg_pp"):
        # CFG++ renoises with the unconditional prediction: a first run with its own naive inversion as N, from
        # backward Euler through euler_cfg_pp's step (with only the CFG runs, dpmpp_2m_cfg_pp stalled at -16 dB
        # on the tiny flow model at cfg 5), then the runs above for what is left above -60 dB (some cells of the
        # analytic mixture reach -85 dB only there: EPS dpmpp_2m_cfg_pp at 20 steps, cfg 3 and 50 steps, cfg 7.5)
        cfg_pp_naive = functools.partial(exact.naive_inversion_cfg_pp, guided_and_uncond=comfy_guided_and_uncond)
        runs = (multistep.ShootingRun(cfg_pp_naive, _own_step_backward_euler("euler_cfg_pp")), *RUNS)
    return functools.partial(multistep.exact_inversion_shooting, sample=comfy_sampler_function(name), runs=runs)


# What inverts each sampler: backward Euler per step where a step stands alone (the paper's method
# for euler; heun and dpm_2 through their own one-step code), shooting through the sampler's own
# function for the rest. The paper's dpmpp_2m algorithm stays available under its own name.
EXACT_INVERSIONS = {"euler": exact.exact_inversion_euler,
                    **{name: _own_step_backward_euler(name) for name in ("heun", "dpm_2")},
                    **{name: _shooting(name) for name in SHOT_SAMPLERS},
                    "dpmpp_2m_backward_euler": exact.exact_inversion_dpmpp_2m}
ROUND_TRIP_RECIPE = round_trip_recipe()


def inversion_sampler(sampler, method="exact", solver=exact.SOLVER, max_iterations=exact.MAX_ITERATIONS,
                      tolerance=exact.TOLERANCE, log=None, max_model_calls=0):
    """The SAMPLER that inverts `sampler` (a key of EXACT_INVERSIONS); `log` (a StepLog) records its steps;
    max_model_calls 0 = the default budget. A new object per call: nothing of a run is kept on it."""
    if method == "naive":
        function, options = exact.naive_inversion, {}
    else:
        function = EXACT_INVERSIONS[sampler]
        options = dict(solver=solver, max_iterations=max_iterations, tolerance=tolerance,
                       max_model_calls=max_model_calls or None)
    return InversionKSampler(log.observe(function) if log is not None else function, options)


def residual_ui(log, method, sampler):
    """The node's convergence view: per-step residuals of the final pass (backward Euler), or the
    regeneration error per iteration (shooting), and the model calls."""
    if method == "naive":
        summary = f"naive inversion: {log.model_calls} model calls, no residual (explicit steps)"
        return convergence_ui("Naive inversion", [], "step", "residual RMS", summary=summary,
                              model_calls=log.model_calls)
    if sampler in SHOT_SAMPLERS:
        errors = log.series("residual")
        best = max(min(per_sample) for per_sample in zip(*errors))   # the worst sample's returned iterate
        summary = (f"{sampler}: {log.model_calls} model calls, {len(errors)} shooting iterations, "
                   f"regeneration error {best:.2e}")
        if any(log.series("hit_cap")[-1]):
            summary += " (above tolerance: it levelled off or ran out of budget; the best iterate is returned)"
        return convergence_ui("Shooting: regeneration error per iteration", errors, "iteration", "RMS",
                              summary=summary, model_calls=log.model_calls)
    final_pass = log.series("residual", last_pass=True)
    worst = max(max(step) for step in final_pass)
    capped = sum(any(step) for step in log.series("hit_cap", last_pass=True))
    summary = f"{sampler}: {log.model_calls} model calls, worst step residual {worst:.2e}"
    if capped:
        summary += f", {capped} step(s) hit the iteration cap"
    passes = log.records[-1].get("pass", 0) + 1
    if passes > 1:
        summary += f", {passes} passes"
    return convergence_ui("Backward Euler residual per step", final_pass, "step", "residual RMS",
                          summary=summary, model_calls=log.model_calls)


def _max_iterations_input():
    return io.Int.Input("max_iterations", default=exact.MAX_ITERATIONS, min=1, max=10000,
                        tooltip="Most solver iterations (model calls) per step for backward Euler (euler, heun, "
                                "dpm_2): 100 is plenty for Anderson, the paper's fixed point uses up to 500. For "
                                "the other samplers, the most shooting iterations per run (each one sampling run and "
                                "one naive inversion; runs from other starts follow for what the earlier ones "
                                "leave above -60 dB, all within max_model_calls).")


def _budget_input():
    # optional: prompts saved before it existed (API format, queued batches) still validate
    return io.Int.Input("max_model_calls", default=0, min=0, max=10_000_000, optional=True,
                        tooltip=f"Budget for the whole inversion: once it has made this many model calls, its "
                                f"solves stop and it returns the best latent found. 0 = "
                                f"{exact.MAX_MODEL_CALLS_PER_STEP} per step.")


def _tolerance_input():
    return io.Float.Input("tolerance", default=exact.TOLERANCE, min=1e-7, max=1.0, step=1e-6, round=False,
                          tooltip="Stop a step when the RMS per latent element of Step(x) - x_known is "
                                  "below this (shooting: of the regenerated latent minus this one; in the sampler's "
                                  "latent units). For a 16-bit model it is "
                                  "raised to what its rounding lets a step reach (fp16 3e-4, bf16 2e-3).")


class ExactInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ExactInversionSampler",
            search_aliases=["backward euler", "unsampler", "inversion sampler", "exact inversion"],
            display_name="Exact Inversion Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "A SAMPLER for SamplerCustom / SamplerCustomAdvanced that inverts a deterministic ComfyUI sampler "
                "exactly: it finds the starting latent from which that sampler, with the same sigmas, cfg and "
                "conditioning, regenerates this latent. euler/ddim, heun and dpm_2: backward Euler per step (Hong "
                "et al. 2024). The others: shooting through the sampler's own code (naive inversion as "
                "preconditioner); dpmpp_2m_backward_euler is the paper's dpmpp_2m algorithm. Use it with "
                "Inversion Sigmas (ascending) and add_noise off. " + ROUND_TRIP_RECIPE),
            inputs=[
                io.Combo.Input("sampler", options=list(EXACT_INVERSIONS), default="euler",
                               tooltip="The sampler you will regenerate with (ddim is euler in ComfyUI)."),
                io.Combo.Input("solver", options=list(SOLVERS), default=exact.SOLVER,
                               tooltip="anderson: accelerated fixed point, fewest model calls. fixed_point: the "
                                       "paper's forward steps (rho 0.5, warm-up, halving on plateau)."),
                _max_iterations_input(),
                _tolerance_input(),
                _budget_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, solver, max_iterations, tolerance, max_model_calls=0) -> io.NodeOutput:
        return io.NodeOutput(inversion_sampler(sampler, "exact", solver, max_iterations, tolerance,
                                               max_model_calls=max_model_calls))


class NaiveInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="NaiveInversionSampler",
            search_aliases=["ddim inversion", "unsampler", "flip sigmas euler"],
            display_name="Naive Inversion Sampler (baseline)",
            category=f"{CATEGORY}/samplers",
            description=(
                "The usual DDIM / Euler inversion (explicit Euler up the sigmas, as FlipSigmas + euler "
                "computes it), as a baseline for the Exact Inversion Sampler. Cheap (one model call per "
                "step) but inexact, increasingly so at high cfg. Use it with Inversion Sigmas."),
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(inversion_sampler("euler", "naive"))


class InvertLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InvertLatent",
            search_aliases=["unsample", "ddim inversion", "latent to noise", "reverse sampling", "exact inversion"],
            display_name="Invert Latent",
            category=CATEGORY,
            description=(
                "Finds the noise latent from which ComfyUI's own sampler, with these settings, regenerates "
                "this latent (exact: backward Euler; naive: FlipSigmas + euler). " + ROUND_TRIP_RECIPE +
                " At high cfg several noises can give the same image: judge by the regenerated latent."),
            inputs=[
                *inversion_node_inputs("The sampler you will regenerate with. Every deterministic sampler "
                                       "can be inverted; ancestral, SDE and other stochastic ones are refused. The "
                                       "full list is offered so the widget can be shared with a KSampler."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The steps you will regenerate with."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will regenerate with."),
                io.Combo.Input("method", options=["exact", "naive"], default="exact",
                               tooltip="exact: backward Euler, reproduces the latent. naive: the usual "
                                       "inversion, one model call per step, inexact."),
                _max_iterations_input(),
                _tolerance_input(),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Invert only this fraction of the schedule; regenerate with the same "
                                       "denoise."),
                _budget_input(),
            ],
            outputs=[io.Latent.Output(display_name="noise",
                                      tooltip="The inverted latent: regenerate from it with no added noise.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sampler_name, scheduler, steps, cfg, method,
                max_iterations, tolerance, denoise, max_model_calls=0) -> io.NodeOutput:
        sampler, log = check_invertible_sampler(sampler_name), StepLog()
        check_latent_channels(model, latent["samples"])
        sigmas = inversion_sigmas(model, scheduler, steps, denoise)
        inverter = inversion_sampler(sampler, method, exact.SOLVER, max_iterations, tolerance, log, max_model_calls)
        noise = invert_whole_latent(model, positive, negative, cfg, latent, inverter, sigmas)
        return io.NodeOutput(noise, ui=residual_ui(log, method, sampler))


class InvertedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InvertedNoise",
            search_aliases=["noise from latent", "inverted noise"],
            display_name="Inverted Noise",
            category=CATEGORY,
            description=(
                "A NOISE for SamplerCustomAdvanced that starts sampling exactly at an inverted latent, on "
                "every model (on flow models at full denoise ComfyUI would otherwise discard the latent). "
                "Pass the same inverted latent as latent_image."),
            inputs=[
                io.Model.Input("model", tooltip="The model you regenerate with."),
                io.Latent.Input("latent", tooltip="The inverted latent (from Invert Latent or an inversion sampler)."),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        check_latent_channels(model, latent["samples"])
        return io.NodeOutput(InvertedNoiseObject(model, latent["samples"]))


NODES = [ExactInversionSampler, NaiveInversionSampler, InvertLatent, InvertedNoise]
