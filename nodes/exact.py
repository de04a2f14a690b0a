"""Exact inversion of every deterministic ComfyUI sampler, plus the naive (FlipSigmas + euler) baseline, as
SAMPLERs and as one "Invert Latent" node. Which inverse each sampler takes is nodes/inverses.py; the maths
is in inversion_ops.exact and inversion_ops.multistep; the ComfyUI plumbing in nodes/sampling.py.
"""
from comfy_api.latest import io

from ..inversion_ops import exact
from ..inversion_ops.common import StepLog
from ..inversion_ops.solvers import SOLVERS
from .inverses import EXACT_INVERSIONS, check_invertible_sampler
from .reversible import invert_latent_reversible
from .sampling import (InversionKSampler, InvertedNoise as InvertedNoiseObject, check_latent_channels,
                       invert_whole_latent, inversion_node_inputs, round_trip_recipe)
from .sigmas import inversion_sigmas
from .ui import CATEGORY, exact_inversion_ui, schema

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


def _max_iterations_input():
    return io.Int.Input("max_iterations", default=exact.MAX_ITERATIONS, min=1, max=10000,
                        tooltip="Backward Euler (euler / ddim, heun, dpm_2, dpmpp_2m_backward_euler): the most "
                                "solver iterations per step. Shooting (the other samplers): the most iterations "
                                "per run, each one sampling run and one naive inversion; runs from other starts "
                                "follow for the samples the earlier ones leave far from the latent, all within "
                                "max_model_calls.")


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
                                  "latent units). For a 16-bit model it is raised to what its rounding lets a "
                                  "step reach.")


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
                               tooltip="How backward Euler solves each step (shooting always uses Anderson). "
                                       "anderson: accelerated fixed point, fewest model calls. fixed_point: the "
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
                "this latent (exact: backward Euler per step for euler / ddim, heun and dpm_2, shooting through the "
                "sampler's own code for the others; naive: FlipSigmas + euler). " + ROUND_TRIP_RECIPE +
                " At high cfg several noises can give the same image: judge by the regenerated latent."),
            inputs=[
                *inversion_node_inputs("The sampler you will regenerate with. Every deterministic sampler "
                                       "can be inverted; ancestral, SDE and other stochastic ones are refused. The "
                                       "full list is offered so the widget can be shared with a KSampler."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The steps you will regenerate with."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will regenerate with."),
                io.Combo.Input("method", options=["exact", "naive", "reversible"], default="exact",
                               tooltip="exact: reproduces the latent (backward Euler per step for euler / ddim, "
                                       "heun and dpm_2; shooting through the sampler's own code for the others). "
                                       "naive: the usual inversion (FlipSigmas + euler) whatever the sampler, one "
                                       "model call per step, inexact. reversible: the exact inverse of the "
                                       "pack's Reversible Sampler (sampler_name is not used), one model call per "
                                       "step; the output carries its second state: regenerate with the "
                                       "Reversible Sampler given this LATENT as second_state."),
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
        log = StepLog()
        check_latent_channels(model, latent["samples"])
        sigmas = inversion_sigmas(model, scheduler, steps, denoise)
        if method == "reversible":
            noise = invert_latent_reversible(model, positive, negative, cfg, latent, sigmas, log=log)
            return io.NodeOutput(noise, ui=exact_inversion_ui(log, method, "reversible"))
        sampler = check_invertible_sampler(sampler_name)
        inverter = inversion_sampler(sampler, method, exact.SOLVER, max_iterations, tolerance, log, max_model_calls)
        noise = invert_whole_latent(model, positive, negative, cfg, latent, inverter, sigmas)
        return io.NodeOutput(noise, ui=exact_inversion_ui(log, method, sampler))


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
