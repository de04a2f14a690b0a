"""Exact inversion of ComfyUI's euler / ddim and dpmpp_2m samplers by backward Euler
(Hong et al., CVPR 2024), plus the naive (FlipSigmas + euler) baseline, as SAMPLERs and as one
"Invert Latent" node. The maths is in inversion_ops.backward_euler; the ComfyUI plumbing
(guider, flow sigma = 1 handling, InvertedNoise) in nodes/sampling.py.
"""
from comfy_api.latest import io

from ..inversion_ops import backward_euler
from .sampling import (CATEGORY, FunctionSampler, InvertedNoise as InvertedNoiseObject, check_ascending_sigmas,
                       check_invertible_sampler, check_latent_channels, invert_whole_latent, inversion_node_inputs)
from .sigmas import inversion_sigmas
from .ui import convergence_ui

SOLVERS = ("anderson", "fixed_point")
# dpmpp_2m: most refine passes after the paper's single pass; they stop once a pass moves the states by
# less than the tolerance. On the tiny models each pass shrinks the change about 2x (slower at cfg >= 5
# with few steps), so 4 passes leave -25..-40 dB regeneration errors that 20 passes remove.
REFINE_PASSES = 20

ROUND_TRIP_RECIPE = (
    "Regenerate with the same model, conditioning, cfg, sampler, scheduler, steps and denoise, "
    "starting from the inverted latent with no added noise. Universal (every model): "
    "SamplerCustomAdvanced with noise = Inverted Noise(model, inverted latent), guider = CFGGuider, "
    "sigmas = BasicScheduler, latent_image = the inverted latent. EPS / V models, or any model at "
    "denoise < 1: also KSampler (Advanced) with add_noise disabled, or SamplerCustom with add_noise off, "
    "latent = the inverted latent. Flow models at full denoise (sigma_max = 1) need the universal "
    "recipe: with add_noise off, ComfyUI multiplies the start latent by 1 - sigma = 0.")


def inversion_run(sampler, method, solver="anderson", iterations=100, tolerance=1e-4):
    """`run(denoise, x, sigmas, callback) -> (x, info)` for FunctionSampler.

    active_only stays False: a conditioning batch may differ per sample, so every model call
    evaluates the whole batch (rows that have converged are simply not updated).
    """
    if method == "naive":
        invert = lambda d, x, s, cb: backward_euler.naive_inversion(d, x, s, callback=cb)
    elif sampler == "euler":
        invert = lambda d, x, s, cb: backward_euler.exact_inversion_euler(
            d, x, s, solver=solver, tol=tolerance, max_iters=iterations, active_only=False, callback=cb)
    else:
        invert = lambda d, x, s, cb: backward_euler.exact_inversion_dpmpp_2m(
            d, x, s, solver=solver, tol=tolerance, max_iters=iterations, refine_passes=REFINE_PASSES,
            active_only=False, callback=cb)

    def run(denoise, x, sigmas, callback):
        check_ascending_sigmas(sigmas)
        return invert(denoise, x, sigmas, callback)
    return run


def residual_ui(info, steps, method, sampler):
    """The per-step residual curve of the final pass, and the model calls, for the node's ui."""
    if method == "naive":
        summary = f"naive inversion: {info.model_calls} model calls, no residual (explicit steps)"
        return convergence_ui("Naive inversion", [], "step", "residual RMS", summary=summary,
                              model_calls=info.model_calls)
    final_pass = info.residuals[-steps:]
    worst = max(max(step) for step in final_pass)
    capped = sum(any(step) for step in info.hit_cap[-steps:])
    summary = f"{sampler}: {info.model_calls} model calls, worst step residual {worst:.2e}"
    if capped:
        summary += f", {capped} step(s) hit the iteration cap"
    extra = {"model_calls": info.model_calls}
    if info.pass_changes:
        extra["refine_pass_changes"] = info.pass_changes
        summary += f", last refine-pass change {max(info.pass_changes[-1]):.2e}"
    return convergence_ui("Backward Euler residual per step", final_pass, "step", "residual RMS",
                          summary=summary, **extra)


def _iterations_input():
    return io.Int.Input("iterations", default=100, min=1, max=10000,
                        tooltip="Most solver iterations (model calls) per step; 100 is plenty for Anderson, "
                                "the paper's fixed point uses up to 500.")


def _tolerance_input():
    return io.Float.Input("tolerance", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=False,
                          tooltip="Stop a step when the RMS per latent element of Step(x) - x_known is "
                                  "below this (in the sampler's latent units). 1e-4 suits float32; use "
                                  "~1e-2 in float16.")


class ExactInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ExactInversionSampler",
            display_name="Exact Inversion Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "A SAMPLER for SamplerCustom / SamplerCustomAdvanced that inverts ComfyUI's euler/ddim or "
                "dpmpp_2m exactly (backward Euler, Hong et al. 2024): it finds the starting latent from which "
                "that sampler, with the same sigmas, cfg and conditioning, regenerates this latent. Use it "
                "with Inversion Sigmas (ascending) and add_noise off. " + ROUND_TRIP_RECIPE),
            inputs=[
                io.Combo.Input("sampler", options=["euler", "dpmpp_2m"], default="euler",
                               tooltip="The sampler you will regenerate with (ddim is euler in ComfyUI)."),
                io.Combo.Input("solver", options=list(SOLVERS), default="anderson",
                               tooltip="anderson: accelerated fixed point, fewest model calls. fixed_point: the "
                                       "paper's forward steps (rho 0.5, warm-up, halving on plateau)."),
                _iterations_input(),
                _tolerance_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampler, solver, iterations, tolerance) -> io.NodeOutput:
        return io.NodeOutput(FunctionSampler(inversion_run(sampler, "exact", solver, iterations, tolerance)))


class NaiveInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NaiveInversionSampler",
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
        return io.NodeOutput(FunctionSampler(inversion_run("euler", "naive")))


class InvertLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InvertLatent",
            display_name="Invert Latent",
            category=CATEGORY,
            description=(
                "Finds the noise latent from which ComfyUI's own sampler, with these settings, regenerates "
                "this latent (exact: backward Euler; naive: FlipSigmas + euler). " + ROUND_TRIP_RECIPE +
                " At high cfg several noises can give the same image: judge by the regenerated latent."),
            inputs=[
                *inversion_node_inputs("The sampler you will regenerate with. Only euler, ddim and dpmpp_2m "
                                       "can be inverted; the full list is offered so the widget can be shared "
                                       "with a KSampler."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The steps you will regenerate with."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will regenerate with."),
                io.Combo.Input("method", options=["exact", "naive"], default="exact",
                               tooltip="exact: backward Euler, reproduces the latent. naive: the usual "
                                       "inversion, one model call per step, inexact."),
                _iterations_input(),
                _tolerance_input(),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Invert only this fraction of the schedule; regenerate with the same "
                                       "denoise."),
            ],
            outputs=[io.Latent.Output(display_name="noise",
                                      tooltip="The inverted latent: regenerate from it with no added noise.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sampler_name, scheduler, steps, cfg, method,
                iterations, tolerance, denoise) -> io.NodeOutput:
        sampler = check_invertible_sampler(sampler_name)
        check_latent_channels(model, latent["samples"])
        sigmas = inversion_sigmas(model, scheduler, steps, denoise)
        inverter = FunctionSampler(inversion_run(sampler, method, "anderson", iterations, tolerance))
        noise = invert_whole_latent(model, positive, negative, cfg, latent, inverter, sigmas)
        return io.NodeOutput(noise, ui=residual_ui(inverter.last_info, steps, method, sampler))


class InvertedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InvertedNoise",
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
