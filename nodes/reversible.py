"""The reversible sampler (inversion_ops.reversible) as SAMPLERs for SamplerCustom / SamplerCustomAdvanced, its
exact inverse as an inversion SAMPLER, and Invert Latent's "reversible" method.

The method's second state (the latent at the schedule's second sigma) travels in the LATENT dict under
STATE_KEY, in the LATENT's own space, beside the sigma it belongs to under STATE_SIGMA_KEY, so a saved
workflow or a queued batch carries it like any latent.
"""
import functools

import torch
from comfy_api.latest import io

from ..inversion_ops import reversible
from .rf import prediction_kind
from .sampling import InversionKSampler, invert_whole_latent
from .ui import CATEGORY, schema

STATE_KEY = "reversible_state"
STATE_SIGMA_KEY = "reversible_sigma"
AUTO = "auto"
VARIANT_HELP = ("auto (default, and Invert Latent's reversible method): ddim_leapfrog on flow models, capped on EPS "
                "and V models. capped: O-BELM's coefficients with the weight on the older state capped at 1 (BDIA "
                "where the steps grow). ddim_leapfrog: BDIA's symmetric step in the data-prediction variables. "
                "o_belm: Wang et al. 2024 as published. bdia: Zhang et al. 2024 with the gamma below. Inversion is "
                "exact in every variant; the samples are not euler's: on flow models above cfg 2 and on EPS models "
                "at cfg 7.5+ below 20 steps they are worse (docs/results.md#reversible-cap and #reversible-flow).")


def resolve_variant(variant, model_sampling):
    """auto's choice, from what the model predicts: ddim_leapfrog's samples stay closer to euler's on flow
    models, capped's round trips are tighter on EPS ones (docs/results.md#reversible-flow)."""
    if variant != AUTO:
        return variant
    return "ddim_leapfrog" if prediction_kind(model_sampling) == "flow" else reversible.VARIANT


def read_second_state(latent, input_name="second_state"):
    """(tensor, sigma or None) of a LATENT's second state: its STATE_KEY entry (Invert Latent, method
    reversible), or its samples (SamplerCustom's denoised_output after the Reversible Inversion Sampler)."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{input_name} must be a LATENT (from Invert Latent with method reversible, or the "
                         f"denoised_output of SamplerCustom running the Reversible Inversion Sampler)")
    state = latent.get(STATE_KEY, latent["samples"])
    name = f"{input_name}['{STATE_KEY}']" if STATE_KEY in latent else f"{input_name}['samples']"
    if not torch.is_tensor(state) or not torch.isfinite(state).all():
        raise ValueError(f"{name} (the reversible sampler's second state) must be a finite latent tensor")
    return state, latent.get(STATE_SIGMA_KEY), name


class ReversibleKSampler(InversionKSampler):
    """InversionKSampler that hands the sampler function a second state given in the LATENT's space:
    it is moved into the sampler's space (process_latent_in) and checked against the latent and sigmas."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        options = dict(self.extra_options)
        options["variant"] = resolve_variant(options.get("variant", AUTO), model_wrap.inner_model.model_sampling)
        state, state_sigma, name = options.pop("second_state", (None, None, None))
        if state is not None:
            state = model_wrap.inner_model.process_latent_in(state.to(device=noise.device, dtype=noise.dtype))
            if state.shape != noise.shape:
                raise ValueError(f"{name} (the reversible sampler's second state) has shape {tuple(state.shape)} "
                                 f"but the latent sampled has {tuple(noise.shape)}: pass the pair one inversion made")
            if state_sigma is not None and (len(sigmas) < 2 or abs(float(sigmas[1]) - state_sigma) >
                                            1e-5 * max(1.0, state_sigma)):
                raise ValueError(f"{name} belongs to sigma {state_sigma:.6g}, but these sigmas' second is "
                                 f"{float(sigmas[1]) if len(sigmas) > 1 else None}: regenerate with the scheduler, "
                                 f"steps and denoise the inversion used")
            options["previous"] = state
        run = InversionKSampler(self.sampler_function, options)
        return InversionKSampler.sample(run, model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                        denoise_mask, disable_pbar)


def _reporting_state_as_denoised(function):
    """The inverse with its last report's `denoised` set to the second state, so SamplerCustom's
    denoised_output carries it out of the graph's one-latent SAMPLER path."""
    @functools.wraps(function)
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        def tee(d):
            if callback is not None:
                callback({**d, "denoised": d["previous"]} if "previous" in d else d)
        return function(model, x, sigmas, extra_args, tee, disable, **options)
    return run


def invert_latent_reversible(model, positive, negative, cfg, latent, sigmas, variant=AUTO,
                             gamma=reversible.GAMMA, log=None):
    """Invert Latent's reversible method: the start latent with its second state under STATE_KEY; `log`
    (a StepLog) records the steps."""
    kept, variant = {}, resolve_variant(variant, model.get_model_object("model_sampling"))

    def invert(model_k, x, sigmas_k, extra_args=None, callback=None, disable=None, **options):
        def keep(d):
            kept.update({"previous": d["previous"]} if "previous" in d else {})
            if callback is not None:
                callback(d)
        callback_out = log.tee(keep) if log is not None else keep
        return reversible.invert_reversible(model_k, x, sigmas_k, extra_args, callback_out, disable, **options)
    out = invert_whole_latent(model, positive, negative, cfg, latent,
                              InversionKSampler(invert, {"variant": variant, "gamma": gamma}), sigmas)
    state = model.model.process_latent_out(kept["previous"].to(torch.float32))
    out[STATE_KEY] = state.to(device=out["samples"].device, dtype=out["samples"].dtype)
    out[STATE_SIGMA_KEY] = float(sigmas.flip(0)[1])
    return out


def _variant_inputs():
    return [
        io.Combo.Input("variant", options=[AUTO, *reversible.VARIANTS], default=AUTO,
                       tooltip=VARIANT_HELP + " Invert with the same variant."),
        io.Float.Input("gamma", default=reversible.GAMMA, min=0.05, max=1.0, step=0.05,
                       tooltip="bdia only: the weight of the step back (1 = symmetric). The inverse divides by "
                               "it at every step, so small values amplify the inverted noise."),
    ]


class ReversibleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ReversibleSampler",
            search_aliases=["reversible sampler", "bdia", "belm", "o-belm", "exact inversion sampler"],
            display_name="Reversible Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "A SAMPLER for SamplerCustom / SamplerCustomAdvanced, one model call per step, whose steps can be "
                "undone exactly (Reversible Inversion Sampler, or Invert Latent with method reversible) without "
                "any solve. To regenerate an inverted latent, pass its LATENT as second_state too: the method "
                "carries the latent at the second sigma beside the start."),
            inputs=[
                *_variant_inputs(),
                io.Latent.Input("second_state", optional=True,
                                tooltip="Only to regenerate an inversion: Invert Latent's output (method "
                                        "reversible), or the denoised_output of SamplerCustom running the "
                                        "Reversible Inversion Sampler. Leave empty to sample from noise."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, variant, gamma, second_state=None) -> io.NodeOutput:
        options = {"variant": variant, "gamma": gamma}
        if second_state is not None:
            options["second_state"] = read_second_state(second_state)
        return io.NodeOutput(ReversibleKSampler(reversible.sample_reversible, options))


class ReversibleInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ReversibleInversionSampler",
            search_aliases=["reversible inversion", "bdia inversion", "belm inversion", "unsampler"],
            display_name="Reversible Inversion Sampler",
            category=f"{CATEGORY}/samplers",
            description=(
                "The exact inverse of the Reversible Sampler, for SamplerCustom with Inversion Sigmas and "
                "add_noise off: one model call per step, no solve. Its output is the start latent and "
                "SamplerCustom's denoised_output is the second state: pass both to regenerate (latent_image "
                "and the Reversible Sampler's second_state)."),
            inputs=_variant_inputs(),
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, variant, gamma) -> io.NodeOutput:
        function = _reporting_state_as_denoised(reversible.invert_reversible)
        return io.NodeOutput(ReversibleKSampler(function, {"variant": variant, "gamma": gamma}))


NODES = [ReversibleSampler, ReversibleInversionSampler]
