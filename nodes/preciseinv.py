"""PreciseInv (Zuo et al., NeurIPS 2025) for ComfyUI's euler / ddim sampler: per step, the noisier
latent is learned by gradient descent so that ONE sampler step from it reproduces the latent
below, for 1 to 50 steps (2- and 4-step few-step settings included). As a SAMPLER for
SamplerCustom / SamplerCustomAdvanced over Inversion Sigmas, and as one "Invert Latent" node.

The maths is in inversion_ops.preciseinv; the guider / sigma plumbing in nodes/sampling.py. What
is here is what backpropagating through ComfyUI's model needs: a full model load whose blocks
recompute their activations in the backward pass (nodes/recompute.py), weights autograd can use
(ComfyUI loads weights inside torch.inference_mode(), and autograd refuses to save inference tensors
for the input gradient), with a clear refusal when the model still cannot be differentiated.
"""
import contextlib

import comfy.model_patcher
import torch
from comfy_api.latest import io

from ..inversion_ops import preciseinv as ops
from ..inversion_ops.common import StepLog
from . import recompute
from .sampling import (CATEGORY, InversionKSampler, check_invertible_sampler, check_latent_channels,
                       invert_whole_latent, inversion_node_inputs, round_trip_recipe)
from .sigmas import inversion_sigmas
from .ui import convergence_ui, schema

ROUND_TRIP_RECIPE = round_trip_recipe("the euler (or ddim) sampler")

NOT_DIFFERENTIABLE = (
    "PreciseInv backpropagates through the model with respect to its input latent, and this model "
    "cannot be differentiated: {error} Quantised or custom weight formats, and patches that run the "
    "model without autograd, do not support this; load the model in a float dtype (UNETLoader "
    "weight_dtype 'default') or use the Exact Inversion nodes, which need no gradients.")
_AUTOGRAD_FAILURES = ("does not require grad", "Inference tensors", "derivative for", "version counter")


def _models_of(guider):
    """The ModelPatchers a guider's sampling run uses: the model, then ControlNets and the like."""
    patchers = [getattr(guider, "model_patcher", None), *(getattr(guider, "loaded_models", None) or [])]
    return [p for p in patchers if isinstance(p, comfy.model_patcher.ModelPatcher)]


def _autograd_view(tensor):
    """A normal (non-inference) tensor over the same memory, through DLPack: no copy. Where DLPack cannot
    carry the tensor (a dtype or device it lacks), a copy."""
    try:
        return torch.from_dlpack(tensor.detach())
    except (RuntimeError, BufferError, TypeError):
        return tensor.detach().clone()


@contextlib.contextmanager
def autograd_weights(modules):
    """Lend every inference-tensor parameter and buffer of `modules` to autograd as a normal, frozen
    tensor over the same memory (requires_grad False: gradients go to the input only), through the
    modules' public register_parameter / register_buffer; the originals are put back on exit.

    ComfyUI loads weights inside torch.inference_mode(), and autograd refuses to save inference tensors
    for the input gradient. A DLPack view is not one, and costs no memory (before: a copy of the weights).
    """
    borrowed, views = [], {}
    with torch.inference_mode(False):
        try:
            for module in modules:
                for sub in module.modules():
                    for kind, store in (("parameter", sub._parameters), ("buffer", sub._buffers)):
                        for name, tensor in list(store.items()):
                            if tensor is None or not tensor.is_inference():
                                continue
                            if kind == "parameter" and not isinstance(tensor, torch.nn.Parameter):
                                continue
                            if id(tensor) not in views:   # tied weights stay tied
                                view = _autograd_view(tensor)
                                views[id(tensor)] = torch.nn.Parameter(view, requires_grad=False) \
                                    if kind == "parameter" else view
                            borrowed.append((sub, kind, name, tensor))
                            _register(sub, kind, name, views[id(tensor)])
            yield
        finally:
            for sub, kind, name, tensor in reversed(borrowed):
                _register(sub, kind, name, tensor)


def _register(module, kind, name, tensor):
    if kind == "parameter":
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=name not in module._non_persistent_buffers_set)


def require_input_gradient(model):
    """`model` that refuses to go on when its output is cut off from autograd (a patch running it under
    no_grad, a non-differentiable kernel): the step loss would still have a gradient through the Euler
    step's own x term, so the optimiser would silently run on a wrong one."""
    def checked(x, sigma, **extra_args):
        denoised = model(x, sigma, **extra_args)
        if x.requires_grad and not denoised.requires_grad:
            raise RuntimeError(NOT_DIFFERENTIABLE.format(
                error="its output does not depend on its input through autograd."))
        return denoised
    return checked


def differentiable_preciseinv(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """ops.preciseinv through ComfyUI's model, with autograd failures explained to the user."""
    try:
        return ops.preciseinv(require_input_gradient(model), x, sigmas, extra_args, callback, disable, **options)
    except RuntimeError as e:
        if any(s in str(e) for s in _AUTOGRAD_FAILURES):
            raise RuntimeError(NOT_DIFFERENTIABLE.format(error=str(e).split("\n")[0])) from e
        raise


class PreciseInvKSampler(InversionKSampler):
    """InversionKSampler that fully loads the guider's models, the diffusion model's blocks recomputing
    their activations in the backward pass (`recompute`), and lends autograd usable weights."""

    def __init__(self, sampler_function, extra_options=None, inpaint_options=None, recompute=True):
        super().__init__(sampler_function, extra_options or {}, inpaint_options or {})
        self.recompute = recompute

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        # newer ComfyUI offloads dynamically; backprop needs every weight resident
        with recompute.loaded_for_backprop(_models_of(model_wrap), self.recompute) as patchers:
            modules = [p.model for p in patchers if isinstance(getattr(p, "model", None), torch.nn.Module)]
            with autograd_weights(modules):
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
                         f"nodes invert dpmpp_2m).")


def invert_latent(model, positive, negative, latent, sampler_name, scheduler, steps, cfg, tolerance,
                  max_iterations, lr=ops.LR):
    """The Invert Latent node's work: returns (noise LATENT, StepLog)."""
    check_preciseinv_sampler(sampler_name)
    check_latent_channels(model, latent["samples"])
    sigmas, log = inversion_sigmas(model, scheduler, steps), StepLog()
    sampler = preciseinv_sampler(tolerance, max_iterations, lr, log)
    return invert_whole_latent(model, positive, negative, cfg, latent, sampler, sigmas), log


def residual_ui(log, tolerance):
    """The per-step residual curve, the steps that stopped at the iteration cap, and the model calls."""
    hit_cap, residuals = log.hit_cap, log.residuals
    samples = len(hit_cap[0]) if hit_cap else 0
    capped = [[k for k, step in enumerate(hit_cap) if step[b]] for b in range(samples)]
    worst = max((max(step) for step in residuals), default=0.0)
    summary = (f"tolerance {tolerance:.3g}: worst step residual {worst:.2e}, {log.model_calls} forward + "
               f"{log.model_calls_backward} backward model calls")
    n_capped = sum(any(step) for step in hit_cap)
    if n_capped:
        summary += f"; {n_capped} of {len(hit_cap)} step(s) stopped at max_iterations above the tolerance"
    return convergence_ui("PreciseInv residual per step", residuals, "step (least noisy first)",
                          "residual RMS per element", summary=summary, steps_at_iteration_cap=capped,
                          iterations=[max(step) for step in log.iterations], model_calls_forward=log.model_calls,
                          model_calls_backward=log.model_calls_backward)


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
        return io.NodeOutput(noise, ui=residual_ui(log, tolerance))


NODES = [PreciseInvSampler, PreciseInvInvertLatent]
