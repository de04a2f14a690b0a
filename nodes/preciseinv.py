"""PreciseInv (Zuo et al., NeurIPS 2025) for ComfyUI's euler / ddim sampler: per step, the noisier
latent is learned by gradient descent so that ONE sampler step from it reproduces the latent
below, for 1 to 50 steps (2- and 4-step few-step settings included). As a SAMPLER for
SamplerCustom / SamplerCustomAdvanced over Inversion Sigmas, and as one "Invert Latent" node.

The maths is in inversion_ops.preciseinv; the guider / sigma plumbing in nodes/sampling.py. What
is here is what backpropagating through ComfyUI's model needs: a full model load, and weights
autograd can use (ComfyUI loads weights inside torch.inference_mode(), and autograd refuses to
save inference tensors for the input gradient), with a clear refusal when the model still cannot
be differentiated.
"""
import contextlib

import comfy.model_management
import torch
from comfy_api.latest import io

from ..inversion_ops.preciseinv import preciseinv
from .sampling import (CATEGORY, FunctionSampler, check_ascending_sigmas, check_invertible_sampler,
                       check_latent_channels, invert_whole_latent, inversion_node_inputs)
from .sigmas import inversion_sigmas
from .ui import convergence_ui

ETA_PRESETS = {"precise (1e-5)": 1e-5, "fast (1e-2)": 1e-2}
DEFAULT_LR = 0.2

ROUND_TRIP_RECIPE = (
    "Regenerate with the same model, conditioning, cfg, scheduler and steps and the euler (or ddim) "
    "sampler, starting from the inverted latent with no added noise: EPS / V models: KSampler (Advanced) "
    "with add_noise disabled, or SamplerCustom with add_noise off and BasicScheduler sigmas. Flow models "
    "(sigma_max = 1): SamplerCustomAdvanced with noise = Inverted Noise(model, inverted latent), "
    "guider = CFGGuider, sigmas = BasicScheduler, latent_image = the inverted latent (with add_noise off "
    "ComfyUI multiplies a flow model's start latent by 1 - sigma = 0).")

NOT_DIFFERENTIABLE = (
    "PreciseInv backpropagates through the model with respect to its input latent, and this model "
    "cannot be differentiated: {error} Quantised or custom weight formats, and patches that run the "
    "model without autograd, do not support this; load the model in a float dtype (UNETLoader "
    "weight_dtype 'default') or use the Exact Inversion nodes, which need no gradients.")
_AUTOGRAD_FAILURES = ("does not require grad", "Inference tensors", "derivative for", "version counter")


def _models_of(guider):
    """The ModelPatchers a guider's sampling run uses: the model, then ControlNets and the like."""
    patcher = getattr(guider, "model_patcher", None)
    return ([patcher] if patcher is not None else []) + list(getattr(guider, "loaded_models", None) or [])


@contextlib.contextmanager
def autograd_weights(modules):
    """Swap every inference-tensor parameter and buffer of `modules` for a normal, frozen copy
    (requires_grad False: gradients go to the input only); the originals are put back on exit.

    ComfyUI loads weights inside torch.inference_mode(); autograd cannot save those for the input
    gradient. The module objects are untouched, only their parameter slots are borrowed. Costs one
    copy of the weights while it runs (as nodes_train's weight wrappers do per forward).
    """
    borrowed, copies = [], {}
    with torch.inference_mode(False):
        try:
            for module in modules:
                for sub in module.modules():
                    for store in (sub._parameters, sub._buffers):
                        for name, tensor in store.items():
                            if tensor is None or not tensor.is_inference():
                                continue
                            if id(tensor) not in copies:   # tied weights stay tied
                                copy = tensor.detach().clone()
                                is_param = isinstance(tensor, torch.nn.Parameter)
                                copies[id(tensor)] = torch.nn.Parameter(copy, requires_grad=False) if is_param else copy
                            borrowed.append((store, name, tensor))
                            store[name] = copies[id(tensor)]
            yield
        finally:
            for store, name, tensor in reversed(borrowed):
                store[name] = tensor


def require_input_gradient(denoise):
    """`denoise` that refuses to go on when the model's output is cut off from autograd (a patch
    running it under no_grad, a non-differentiable kernel): the step loss would still have a
    gradient through the Euler step's own x term, so the optimiser would silently run on a wrong one."""
    def checked(x, sigma):
        denoised = denoise(x, sigma)
        if x.requires_grad and not denoised.requires_grad:
            raise RuntimeError(NOT_DIFFERENTIABLE.format(
                error="its output does not depend on its input through autograd."))
        return denoised
    return checked


def preciseinv_run(eta, max_iterations, lr=DEFAULT_LR):
    """`run(denoise, x, sigmas, callback) -> (x, info)` for FunctionSampler."""
    def run(denoise, x, sigmas, callback):
        check_ascending_sigmas(sigmas)
        try:   # a conditioning batch may differ per row: every model call takes the whole batch
            return preciseinv(require_input_gradient(denoise), x, sigmas, eta=eta, max_iters=max_iterations,
                              lr=lr, callback=callback, active_only=False)
        except RuntimeError as e:
            if any(s in str(e) for s in _AUTOGRAD_FAILURES):
                raise RuntimeError(NOT_DIFFERENTIABLE.format(error=str(e).split("\n")[0])) from e
            raise
    return run


class PreciseInvFunctionSampler(FunctionSampler):
    """FunctionSampler that fully loads the guider's models and lends autograd usable weights."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        patchers = _models_of(model_wrap)
        if patchers:   # newer ComfyUI offloads dynamically; backprop needs every weight resident
            comfy.model_management.load_models_gpu(patchers, force_full_load=True)
        modules = [p.model for p in patchers if isinstance(getattr(p, "model", None), torch.nn.Module)]
        with autograd_weights(modules):
            return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                  denoise_mask, disable_pbar)


def check_preciseinv_sampler(sampler_name):
    """PreciseInv inverts one euler / ddim step; refuse every other sampler, saying why."""
    if check_invertible_sampler(sampler_name) != "euler":
        raise ValueError(f"sampler_name {sampler_name!r}: PreciseInv learns each step's noise for the euler / "
                         f"ddim update only; use euler or ddim here and to regenerate (the Exact Inversion "
                         f"nodes invert dpmpp_2m).")


def invert_latent(model, positive, negative, latent, sampler_name, scheduler, steps, cfg, eta,
                  max_iterations, lr=DEFAULT_LR):
    """The Invert Latent node's work: returns (noise LATENT, PreciseInvInfo)."""
    check_preciseinv_sampler(sampler_name)
    check_latent_channels(model, latent["samples"])
    sigmas = inversion_sigmas(model, scheduler, steps)
    sampler = PreciseInvFunctionSampler(preciseinv_run(eta, max_iterations, lr))
    noise = invert_whole_latent(model, positive, negative, cfg, latent, sampler, sigmas)
    return noise, sampler.last_info


def loss_ui(info, eta):
    """The per-step loss curve, the steps that stopped at the iteration cap, and the model calls."""
    samples = len(info.hit_cap[0]) if info.hit_cap else 0
    capped = [[k for k, step in enumerate(info.hit_cap) if step[b]] for b in range(samples)]
    worst = max((max(step) for step in info.residuals), default=0.0)
    summary = (f"eta {eta:g}: worst step loss {worst:.2e}, {info.model_calls_forward} forward + "
               f"{info.model_calls_backward} backward model calls")
    n_capped = sum(any(step) for step in info.hit_cap)
    if n_capped:
        summary += f"; {n_capped} of {len(info.hit_cap)} step(s) stopped at max_iterations above eta"
    return convergence_ui("PreciseInv loss per step", info.residuals, "step (least noisy first)",
                          "loss (MSE per element)", summary=summary, steps_at_iteration_cap=capped,
                          iterations=info.iterations, model_calls_forward=info.model_calls_forward,
                          model_calls_backward=info.model_calls_backward)


def _eta_input():
    return io.Combo.Input("eta", options=list(ETA_PRESETS), default="precise (1e-5)",
                          tooltip="Stop a step once its loss (mean squared error per latent element of the "
                                  "regenerated step) is below this: the paper's precise 1e-5 or fast 1e-2.")


def _max_iterations_input():
    return io.Int.Input("max_iterations", default=200, min=1, max=10000,
                        tooltip="Most gradient steps per sampling step (each one forward and one backward "
                                "model pass). Steps that stop here above eta are flagged in the node's ui.")


class PreciseInvSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PreciseInvSampler",
            display_name="PreciseInv Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "A SAMPLER for SamplerCustom / SamplerCustomAdvanced that inverts ComfyUI's euler / ddim by "
                "PreciseInv (Zuo et al. 2025): for each step it learns, by gradient descent through the model, "
                "the noisier latent from which one euler step reproduces the latent below. Works from 1 to 50 "
                "steps, including 2- and 4-step few-step models. Use it with Inversion Sigmas and add_noise "
                "off. " + ROUND_TRIP_RECIPE),
            inputs=[
                _eta_input(),
                _max_iterations_input(),
                io.Float.Input("lr", default=DEFAULT_LR, min=1e-4, max=10.0, step=0.01, round=False,
                               tooltip="Size of the first gradient step in noise units (the latent moves by about "
                                       "lr * sigma per element); later steps are chosen by Barzilai-Borwein."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta, max_iterations, lr) -> io.NodeOutput:
        return io.NodeOutput(PreciseInvFunctionSampler(preciseinv_run(ETA_PRESETS[eta], max_iterations, lr)))


class PreciseInvInvertLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PreciseInvInvertLatent",
            display_name="PreciseInv Invert Latent",
            category=CATEGORY,
            description=(
                "Finds the noise latent from which ComfyUI's euler / ddim sampler, with these settings, "
                "regenerates this latent, by PreciseInv (per-step noise learned by gradient descent through "
                "the model; 1 to 50 steps). Its ui shows each step's final loss and flags the steps that "
                "stopped at max_iterations. " + ROUND_TRIP_RECIPE),
            inputs=[
                *inversion_node_inputs("The sampler you will regenerate with: euler or ddim (the full list is "
                                       "offered so the widget can be shared with a KSampler)."),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="The steps you will regenerate with."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The cfg you will regenerate with."),
                _eta_input(),
                _max_iterations_input(),
            ],
            outputs=[io.Latent.Output(display_name="noise",
                                      tooltip="The inverted latent: regenerate from it with no added noise.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sampler_name, scheduler, steps, cfg, eta,
                max_iterations) -> io.NodeOutput:
        noise, info = invert_latent(model, positive, negative, latent, sampler_name, scheduler, steps, cfg,
                                    ETA_PRESETS[eta], max_iterations)
        return io.NodeOutput(noise, ui=loss_ui(info, ETA_PRESETS[eta]))


NODES = [PreciseInvSampler, PreciseInvInvertLatent]
