"""PreciseInv (Zuo et al., NeurIPS 2025) for ComfyUI's euler / ddim sampler: per step, the noisier
latent is learned by gradient descent so that ONE sampler step from it reproduces the latent
below, for 1 to 50 steps (2- and 4-step few-step settings included). As a SAMPLER for
SamplerCustom / SamplerCustomAdvanced over Inversion Sigmas, and as one "Invert Latent" node.

The maths is in inversion_ops.preciseinv; backpropagating through ComfyUI's model in nodes/autograd.py;
the guider / sigma plumbing in nodes/sampling.py.
"""
from comfy_api.latest import io

from ..inversion_ops import preciseinv as ops
from ..inversion_ops.common import StepLog
from . import autograd
from .inverses import check_invertible_sampler
from .sampling import (InversionKSampler, check_latent_channels, invert_whole_latent, inversion_node_inputs,
                       round_trip_recipe)
from .sigmas import inversion_sigmas
from .ui import CATEGORY, preciseinv_ui, schema

ROUND_TRIP_RECIPE = round_trip_recipe("the euler (or ddim) sampler")


def differentiable_preciseinv(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """ops.preciseinv through ComfyUI's model, with autograd failures explained to the user."""
    with autograd.failures_explained():
        return ops.preciseinv(autograd.require_input_gradient(model), x, sigmas, extra_args, callback, disable,
                              **options)


class PreciseInvKSampler(InversionKSampler):
    """InversionKSampler that fully loads the guider's models, the diffusion model's blocks recomputing
    their activations in the backward pass (`recompute`), and lends autograd usable weights."""

    def __init__(self, sampler_function, extra_options=None, inpaint_options=None, recompute=True):
        super().__init__(sampler_function, extra_options or {}, inpaint_options or {})
        self.recompute = recompute

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        # newer ComfyUI offloads dynamically; backprop needs every weight resident
        with autograd.differentiable(model_wrap, self.recompute):
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                  denoise_mask, disable_pbar)


def preciseinv_sampler(tolerance, max_iterations, lr=ops.LR, log=None):
    """The SAMPLER; `log` (a StepLog) records its steps. A new object per call, holding no run state."""
    function = log.observe(differentiable_preciseinv) if log is not None else differentiable_preciseinv
    return PreciseInvKSampler(function, dict(tolerance=tolerance, max_iterations=max_iterations, lr=lr))


def check_preciseinv_sampler(sampler_name):
    """PreciseInv inverts one euler / ddim step; refuse every other sampler, saying why."""
    if check_invertible_sampler(sampler_name) != "euler":
        raise ValueError(f"sampler_name {sampler_name!r}: PreciseInv learns each step's noise for the euler / "
                         f"ddim update only; use euler or ddim here and to regenerate (the Exact Inversion "
                         f"nodes invert the other deterministic samplers).")


def invert_latent(model, positive, negative, latent, sampler_name, scheduler, steps, cfg, tolerance,
                  max_iterations, lr=ops.LR):
    """The Invert Latent node's work: returns (noise LATENT, StepLog)."""
    check_preciseinv_sampler(sampler_name)
    check_latent_channels(model, latent["samples"])
    sigmas, log = inversion_sigmas(model, scheduler, steps), StepLog()
    sampler = preciseinv_sampler(tolerance, max_iterations, lr, log)
    return invert_whole_latent(model, positive, negative, cfg, latent, sampler, sigmas), log


def _tolerance_input():
    return io.Combo.Input("tolerance", options=list(ops.TOLERANCES), default=next(iter(ops.TOLERANCES)),
                          tooltip="Stop a step once the RMS per latent element of its regenerated step is below "
                                  "the square root of the paper's loss threshold eta: precise 1e-5 or fast 1e-2.")


def _max_iterations_input():
    return io.Int.Input("max_iterations", default=ops.MAX_ITERATIONS, min=1, max=10000,
                        tooltip="Most gradient steps per sampling step (each one forward and one backward "
                                "model pass). Steps that stop here above the tolerance are flagged in the ui.")


class PreciseInvSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PreciseInvSampler",
            search_aliases=["preciseinv", "few-step inversion", "lcm inversion", "turbo inversion"],
            display_name="PreciseInv Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "A SAMPLER for SamplerCustom / SamplerCustomAdvanced that inverts ComfyUI's euler / ddim by "
                "PreciseInv (Zuo et al. 2025): for each step it learns, by gradient descent through the model, "
                "the noisier latent from which one euler step reproduces the latent below. Works from 1 to 50 "
                "steps, including 2- and 4-step few-step models. Use it with Inversion Sigmas and add_noise "
                "off. " + ROUND_TRIP_RECIPE),
            inputs=[
                _tolerance_input(),
                _max_iterations_input(),
                io.Float.Input("lr", default=ops.LR, min=1e-4, max=10.0, step=0.01, round=False,
                               tooltip="Size of the first gradient step in noise units (the latent moves by about "
                                       "lr * sigma per element); later steps are chosen by Barzilai-Borwein."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, tolerance, max_iterations, lr) -> io.NodeOutput:
        return io.NodeOutput(preciseinv_sampler(ops.TOLERANCES[tolerance], max_iterations, lr))


class PreciseInvInvertLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PreciseInvInvertLatent",
            search_aliases=["preciseinv", "few-step inversion", "lcm inversion", "turbo inversion"],
            display_name="PreciseInv Invert Latent",
            category=CATEGORY,
            description=(
                "Finds the noise latent from which ComfyUI's euler / ddim sampler, with these settings, "
                "regenerates this latent, by PreciseInv (per-step noise learned by gradient descent through "
                "the model; 1 to 50 steps). Its ui shows each step's final residual and flags the steps that "
                "stopped at max_iterations. " + ROUND_TRIP_RECIPE),
            inputs=[
                *inversion_node_inputs("The sampler you will regenerate with: euler or ddim (the full list is "
                                       "offered so the widget can be shared with a KSampler)."),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="The steps you will regenerate with."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will regenerate with."),
                _tolerance_input(),
                _max_iterations_input(),
            ],
            outputs=[io.Latent.Output(display_name="noise",
                                      tooltip="The inverted latent: regenerate from it with no added noise.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sampler_name, scheduler, steps, cfg, tolerance,
                max_iterations) -> io.NodeOutput:
        tolerance = ops.TOLERANCES[tolerance]
        noise, log = invert_latent(model, positive, negative, latent, sampler_name, scheduler, steps, cfg,
                                   tolerance, max_iterations)
        return io.NodeOutput(noise, ui=preciseinv_ui(log, tolerance))


NODES = [PreciseInvSampler, PreciseInvInvertLatent]
