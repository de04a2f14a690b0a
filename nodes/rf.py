"""RF-Inversion (Rout et al., ICLR 2025) for every rectified-flow model ComfyUI loads.

Two SAMPLERs for SamplerCustom / SamplerCustomAdvanced (forward: image -> structured noise over
Inversion Sigmas; reverse: noise -> edited image over BasicScheduler's sigmas, pulled toward a
reference latent) and a one-node edit. The maths is in inversion_ops/rf.py; here the
model is checked to be a flow model by what its
model_sampling does, never by its class or family.
"""
import comfy.samplers
import torch
from comfy_api.latest import io

from ..inversion_ops import rf as ops
from ..inversion_ops.common import StepLog
from .sampling import (InversionKSampler, check_latent_channels, check_noise_mask, masked_start,
                       run_sampler)
from .sigmas import inversion_sigmas
from .ui import CATEGORY, rf_edit_ui, schema

MODES = ("ode", "sde")
FUNCTIONS = {("forward", "ode"): ops.controlled_forward, ("forward", "sde"): ops.controlled_forward_sde,
             ("reverse", "ode"): ops.controlled_reverse, ("reverse", "sde"): ops.controlled_reverse_sde}


def prediction_kind(model_sampling):
    """What the model predicts, read from model_sampling's behaviour at sigma = 0.5.

    Flow (CONST): noise_scaling keeps (1 - sigma) of the latent and denoised = x - sigma*v.
    EPS: keeps the whole latent, denoised = x - sigma*eps. V: denoised shrinks x by
    sigma_data^2/(sigma^2 + sigma_data^2). X0: denoised is the output itself.
    """
    # scalar probes of model_sampling's arithmetic, read back as floats
    sigma, zero, one = torch.tensor([0.5]), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)  # cpu: read as floats
    kept = float(model_sampling.noise_scaling(sigma, zero.clone(), one))
    from_output = float(model_sampling.calculate_denoised(sigma, one, zero))  # -sigma for x - sigma*out
    from_input = float(model_sampling.calculate_denoised(sigma, zero, one))   # 1 if x passes through
    close = lambda a, b: abs(a - b) < 1e-6  # noqa: E731
    if close(from_output, -0.5) and close(from_input, 1.0):
        if close(kept, 0.5):
            return "flow"
        if close(kept, 1.0):
            return "eps"
    if close(from_input, 0.0):
        return "x0"
    if close(kept, 1.0) and from_input < 1.0:
        return "v"
    return "an unsupported parameterization"


def check_flow_model(model_sampling, method="RF-Inversion"):
    kind = prediction_kind(model_sampling)
    if kind != "flow":
        raise ValueError(f"{method} needs a rectified-flow model; this model predicts {kind} (its model_sampling "
                         f"is not CONST): use Invert Latent (Exact Inversion) and regenerate with the target "
                         f"prompt instead.")


def _check_direction(sigmas, ascending, node):
    first, last = float(sigmas[0]), float(sigmas[-1])
    if ascending and not first < last:
        raise ValueError(f"{node} runs image -> noise and needs ascending sigmas (Inversion Sigmas), "
                         f"got {first:.4g} -> {last:.4g}.")
    if not ascending and not first > last:
        raise ValueError(f"{node} runs noise -> image and needs descending sigmas (BasicScheduler), "
                         f"got {first:.4g} -> {last:.4g}: use Inversion Sigmas only for RF Forward Sampler.")


def reference_in_model_space(base_model, reference, like):
    """The reference LATENT's samples (user space) in the sampler's space (process_latent_in),
    broadcast over the batch of `like`."""
    if reference.ndim != like.ndim or reference.shape[1:] != like.shape[1:] or reference.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"reference latent has shape {tuple(reference.shape)} but the latent being sampled has "
                         f"{tuple(like.shape)}: pass the latent of the image you inverted (same size, batch 1 "
                         f"or the same batch).")
    y0 = base_model.process_latent_in(reference.to(device=like.device, dtype=like.dtype))
    return y0.expand_as(like)


class ControlledFlowSampler(InversionKSampler):
    """RF-Inversion's controlled flow as a SAMPLER: checks the model is a flow model and the schedule's
    direction, and moves the reverse flow's reference latent into the sampler's space for each run
    (on a new InversionKSampler: nothing of a run is kept on this object). A noise_mask inverts the whole
    latent forward, and in reverse edits only inside the mask: ComfyUI's inpainting keeps the reference
    outside, from the same start."""

    def __init__(self, direction, mode="ode", log=None, **options):
        function = FUNCTIONS[(direction, mode)]
        if (direction, mode) == ("reverse", "ode"):
            options.pop("seed", None)   # the only variant that draws no noise
        super().__init__(log.observe(function) if log is not None else function, options)
        self.direction = direction

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        check_flow_model(model_wrap.inner_model.model_sampling)
        forward = self.direction == "forward"
        _check_direction(sigmas, forward, "RF Forward Sampler" if forward else "RF Reverse Sampler")
        options = dict(self.extra_options)
        if forward:
            denoise_mask = None     # the mask would blend the source back in on the way to noise
        else:
            options["reference"] = reference_in_model_space(model_wrap.inner_model, options["reference"], latent_image)
        if denoise_mask is not None:
            noise, latent_image = masked_start(model_wrap.inner_model.model_sampling, sigmas[0], noise, latent_image,
                                               options["reference"])
        return InversionKSampler(self.sampler_function, options).sample(
            model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def _check_window(start, stop):
    if not 0.0 <= start < stop <= 1.0:
        raise ValueError(f"start and stop are fractions of the steps with 0 <= start < stop <= 1, "
                         f"got start={start}, stop={stop}.")


def _mode_input():
    return io.Combo.Input("mode", options=list(MODES), default="ode",
                          tooltip="ode: deterministic controlled flow (the paper's default). sde: the controlled "
                                  "stochastic flow, seeded; its forward needs no model calls.")


def _seed_input(what):
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                        tooltip=f"Seeds {what}; sample b of a batch uses seed + b.")


class RFForwardSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="RFForwardSampler",
            search_aliases=["rf inversion", "rectified flow inversion", "flux inversion", "sd3 inversion"],
            display_name="RF Forward Sampler (invert)",
            category=f"{CATEGORY}/rf_inversion",
            description=(
                "RF-Inversion's controlled forward flow: turns an image latent into structured noise for a "
                "rectified-flow model (SD3, Flux, AuraFlow, ...). Use in SamplerCustom / SamplerCustomAdvanced "
                "with Inversion Sigmas, add_noise off, and the source (or empty) prompt at cfg 1; regenerate "
                "with RF Reverse Sampler. gamma 0 is plain ODE inversion."),
            inputs=[
                io.Float.Input("gamma", default=ops.GAMMA, min=0.0, max=1.0, step=0.01,
                               tooltip="Controller strength: 0 = plain ODE inversion (exact round trip), 1 = land "
                                       "on Gaussian noise regardless of the image. Higher makes the noise more "
                                       "editable and less faithful."),
                _seed_input("the Gaussian target noise y1 (and the SDE's noise)"),
                _mode_input(),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, gamma, seed, mode) -> io.NodeOutput:
        return io.NodeOutput(ControlledFlowSampler("forward", mode, seed=seed, gamma=gamma))


class RFReverseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="RFReverseSampler",
            search_aliases=["rf inversion", "rectified flow edit", "flux edit", "sd3 edit"],
            display_name="RF Reverse Sampler (edit)",
            category=f"{CATEGORY}/rf_inversion",
            description=(
                "RF-Inversion's controlled reverse flow: generates from inverted noise while pulling toward the "
                "reference latent for the first steps, so the layout stays and the prompt edits. Use in "
                "SamplerCustom / SamplerCustomAdvanced with BasicScheduler and add_noise off (DisableNoise) on the "
                "latent from RF Forward Sampler. eta 0 is ComfyUI's euler."),
            inputs=[
                io.Latent.Input("reference", tooltip="The latent of the source image (the one you inverted)."),
                io.Float.Input("eta", default=ops.ETA, min=0.0, max=1.0, step=0.01,
                               tooltip="Pull toward the reference inside [start, stop): 0 = plain generation, "
                                       "1 = follow the reference entirely there."),
                io.Float.Input("start", default=ops.START, min=0.0, max=1.0, step=0.01,
                               tooltip="First controlled step, as a fraction of the steps."),
                io.Float.Input("stop", default=ops.STOP, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the controlled steps (exclusive), as a fraction of the steps. "
                                       "Later = closer to the source, less edit."),
                io.Combo.Input("trend", options=list(ops.TRENDS), default="constant",
                               tooltip="How eta varies inside [start, stop)."),
                _mode_input(),
                _seed_input("the SDE's noise (unused in ode mode)"),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, reference, eta, start, stop, trend, mode, seed) -> io.NodeOutput:
        _check_window(start, stop)
        return io.NodeOutput(ControlledFlowSampler("reverse", mode, seed=seed, reference=reference["samples"], eta=eta,
                                                   start=start, stop=stop, trend=trend))


def rf_inversion_edit(model, source, target, negative, latent, steps, scheduler, cfg, gamma, eta, start, stop,
                      seed):
    """Invert with the source conditioning at cfg 1 (plain velocity, as the paper inverts), then
    the controlled reverse toward the source latent with the target conditioning. Returns
    (edited LATENT, forward info, reverse info)."""
    check_flow_model(model.get_model_object("model_sampling"))
    check_latent_channels(model, latent["samples"])
    check_noise_mask(latent)
    _check_window(start, stop)
    if negative is None and cfg != 1.0:
        raise ValueError(f"cfg is {cfg}: connect a negative conditioning, or set cfg to 1 (Flux keeps cfg 1 and "
                         f"takes its guidance from the conditioning).")
    clean = {"samples": latent["samples"]}     # a noise_mask would blend noise into the inversion
    up = inversion_sigmas(model, scheduler, steps)
    forward_log, reverse_log = StepLog(), StepLog()
    forward = ControlledFlowSampler("forward", log=forward_log, seed=seed, gamma=gamma)
    inverted = run_sampler(model, source, source, 1.0, clean, forward, up)
    if "noise_mask" in latent:
        inverted["noise_mask"] = latent["noise_mask"]
    reverse = ControlledFlowSampler("reverse", log=reverse_log, seed=seed, reference=latent["samples"], eta=eta,
                                    start=start, stop=stop)
    edited = run_sampler(model, target, negative if negative is not None else target, cfg, inverted, reverse,
                         up.flip(0))
    out = latent.copy()
    out["samples"] = edited["samples"]
    return out, forward_log, reverse_log


class RFInversionEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = ops.EDIT_DEFAULTS
        return schema(
            node_id="RFInversionEdit",
            search_aliases=["rf inversion", "flux edit", "sd3 edit", "image edit", "rectified flow edit"],
            display_name="RF-Inversion Edit",
            category=f"{CATEGORY}/rf_inversion",
            description=(
                "Edits an image latent with a rectified-flow model (SD3, Flux, ...): inverts it to structured "
                "noise with the source prompt, then regenerates with the target prompt while following the "
                "source layout for the first steps. No training, no attention patches; model patches apply. "
                "A noise_mask on the latent (Set Latent Noise Mask) confines the edit to the mask; the rest "
                "stays the source. For a soft (feathered) mask put Differential Diffusion on the model."),
            inputs=[
                io.Model.Input("model", tooltip="A rectified-flow model (model_sampling CONST)."),
                io.Conditioning.Input("source", tooltip="Describes the image as it is (or an empty prompt); "
                                                        "used for the inversion at cfg 1."),
                io.Conditioning.Input("target", tooltip="Describes the image as you want it."),
                io.Latent.Input("latent", tooltip="The image to edit, encoded with this model's VAE."),
                io.Int.Input("steps", default=d["steps"], min=2, max=1000,
                             tooltip="Steps for both the inversion and the edit."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="Schedule for both passes (simple follows the model's shift)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG of the edit pass. 1 for Flux (guidance is in the conditioning); "
                                       "SD3 usually wants 3-5 with a negative."),
                io.Float.Input("gamma", default=d["gamma"], min=0.0, max=1.0, step=0.01,
                               tooltip="Inversion controller: higher = more editable noise, less faithful."),
                io.Float.Input("eta", default=d["eta"], min=0.0, max=1.0, step=0.01,
                               tooltip="Pull toward the source during [start, stop) of the edit: higher keeps "
                                       "more of the source."),
                io.Float.Input("start", default=d["start"], min=0.0, max=1.0, step=0.01,
                               tooltip="First controlled edit step, as a fraction of the steps."),
                io.Float.Input("stop", default=d["stop"], min=0.0, max=1.0, step=0.01,
                               tooltip="End of the controlled edit steps, as a fraction: later keeps more of the "
                                       "source, earlier edits more."),
                _seed_input("the inversion's Gaussian target y1"),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning for the edit pass when cfg is not 1."),
            ],
            outputs=[io.Latent.Output(display_name="edited")],
        )

    @classmethod
    def execute(cls, model, source, target, latent, steps, scheduler, cfg, gamma, eta, start, stop, seed,
                negative=None) -> io.NodeOutput:
        edited, forward_log, reverse_log = rf_inversion_edit(model, source, target, negative, latent, steps,
                                                             scheduler, cfg, gamma, eta, start, stop, seed)
        return io.NodeOutput(edited, ui=rf_edit_ui(forward_log, reverse_log))


NODES = [RFForwardSampler, RFReverseSampler, RFInversionEdit]
