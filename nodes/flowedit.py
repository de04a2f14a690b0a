"""FlowEdit (Kulikov et al. 2024) for every rectified-flow model ComfyUI loads: a GUIDER that holds the source
and target prompts with their cfg, a SAMPLER for SamplerCustomAdvanced, and a one-node edit. The maths is in
inversion_ops/flowedit.py; the sampler asks the guider for the source prediction through model_options.
"""
import comfy.samplers
from comfy_api.latest import io

from ..inversion_ops import flowedit as ops
from .rf import check_flow_model
from .sampling import InversionKSampler, check_latent_channels, check_noise_mask, run_guider
from .ui import CATEGORY, schema

BRANCH = "flowedit_branch"   # model_options key: which prompt the guider predicts with


class FlowEditGuiderObject(comfy.samplers.CFGGuider):
    """CFG with the target prompt, or with the source prompt (and its own cfg) when model_options asks."""

    def set_prompts(self, source, target, negative, source_cfg, target_cfg):
        self.inner_set_conds({"positive": target, "negative": negative, "source": source})
        self.cfg, self.source_cfg = target_cfg, source_cfg

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        source = model_options.get(BRANCH) == "source"
        cond, cfg = (self.conds.get("source"), self.source_cfg) if source else (self.conds.get("positive"), self.cfg)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), cond, cfg,
                                                model_options=model_options, seed=seed)


class FlowEditKSampler(InversionKSampler):
    """FlowEdit as a SAMPLER: latent_image is the source; the start noise is unused. A noise_mask confines
    the edit (the update is masked inside the function, so the model sees coupled noisy points everywhere);
    a soft mask grades the edited steps itself, as Differential Diffusion grades a KSampler's."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        check_flow_model(model_wrap.inner_model.model_sampling, "FlowEdit")
        if not isinstance(model_wrap, FlowEditGuiderObject):
            raise ValueError("FlowEdit Sampler needs the FlowEdit Guider (source and target prompts) as its "
                             "guider in SamplerCustomAdvanced.")
        if not float(sigmas[0]) > float(sigmas[-1]):
            raise ValueError("FlowEdit Sampler runs noise -> image and needs descending sigmas (BasicScheduler).")
        model_options = extra_args.get("model_options", {})
        options = {**self.extra_options, "source": latent_image, "mask": denoise_mask,
                   "source_args": {"model_options": {**model_options, BRANCH: "source"}}}
        return InversionKSampler(self.sampler_function, options).sample(
            model_wrap, sigmas, extra_args, callback, noise, latent_image, None, disable_pbar)


def _check_counts(n_max, n_min):
    if not 0 <= n_min <= n_max:
        raise ValueError(f"n_min must be between 0 and n_max, got n_min={n_min}, n_max={n_max}.")


def _sampler_inputs():
    return [
        io.Int.Input("n_max", default=ops.N_MAX, min=1, max=1000,
                     tooltip="Steps edited, counted from the end of the schedule (the first steps - n_max are "
                             "skipped): more = stronger edit, less of the source kept."),
        io.Int.Input("n_min", default=ops.N_MIN, min=0, max=1000,
                     tooltip="The last n_min steps sample the target directly (finer detail, less of the source)."),
        io.Int.Input("n_avg", default=ops.N_AVG, min=1, max=64,
                     tooltip="Noises averaged per step (each costs two model calls)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds the noises; sample b of a batch uses seed + b."),
    ]


def _prompt_inputs():
    return [
        io.Conditioning.Input("source", tooltip="Describes the image as it is."),
        io.Conditioning.Input("target", tooltip="Describes the image as you want it."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning for both (an empty prompt, as the paper)."),
        io.Float.Input("source_cfg", default=ops.SOURCE_CFG, min=0.0, max=100.0, step=0.1,
                       tooltip="CFG of the source prediction."),
        io.Float.Input("target_cfg", default=ops.TARGET_CFG, min=0.0, max=100.0, step=0.1,
                       tooltip="CFG of the target prediction: higher edits more."),
    ]


def flowedit_guider(model, source, target, negative, source_cfg, target_cfg):
    check_flow_model(model.get_model_object("model_sampling"), "FlowEdit")
    guider = FlowEditGuiderObject(model)
    guider.set_prompts(source, target, negative, source_cfg, target_cfg)
    return guider


class FlowEditGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="FlowEditGuider",
            search_aliases=["flowedit", "flow edit", "inversion free edit"],
            display_name="FlowEdit Guider",
            category=f"{CATEGORY}/flowedit",
            description="The source and target prompts of a FlowEdit edit, for SamplerCustomAdvanced with "
                        "FlowEdit Sampler, BasicScheduler and the source latent as latent_image.",
            inputs=[io.Model.Input("model", tooltip="A rectified-flow model (model_sampling CONST)."),
                    *_prompt_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, source, target, negative, source_cfg, target_cfg) -> io.NodeOutput:
        return io.NodeOutput(flowedit_guider(model, source, target, negative, source_cfg, target_cfg))


class FlowEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="FlowEditSampler",
            search_aliases=["flowedit", "flow edit", "inversion free edit"],
            display_name="FlowEdit Sampler",
            category=f"{CATEGORY}/flowedit",
            description="FlowEdit (Kulikov et al. 2024): edits the latent_image toward the target prompt without "
                        "inverting it. Use with FlowEdit Guider, BasicScheduler and DisableNoise; a noise_mask "
                        "confines the edit (a soft mask edits its partial values over fewer steps).",
            inputs=_sampler_inputs(),
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, n_max, n_min, n_avg, seed) -> io.NodeOutput:
        _check_counts(n_max, n_min)
        return io.NodeOutput(FlowEditKSampler(ops.flow_edit, {"n_max": n_max, "n_min": n_min, "n_avg": n_avg,
                                                              "seed": seed}))


class FlowEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="FlowEdit",
            search_aliases=["flowedit", "flow edit", "inversion free edit", "sd3 edit", "flux edit"],
            display_name="FlowEdit",
            category=f"{CATEGORY}/flowedit",
            description="Edits an image or video latent with a rectified-flow model (SD3, Flux, Wan, ...) from a "
                        "source and a target prompt, without inversion (Kulikov et al. 2024). A noise_mask on the "
                        "latent (Set Latent Noise Mask) confines the edit; the rest stays the source. A soft "
                        "(feathered) mask hides the seam: a value m is edited over the last m of the edited steps.",
            inputs=[io.Model.Input("model", tooltip="A rectified-flow model (model_sampling CONST)."),
                    *_prompt_inputs(),
                    io.Latent.Input("latent", tooltip="The image to edit, encoded with this model's VAE."),
                    io.Int.Input("steps", default=ops.STEPS, min=1, max=1000, tooltip="Steps of the schedule (T)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                                   tooltip="Schedule (simple follows the model's shift)."),
                    *_sampler_inputs()],
            outputs=[io.Latent.Output(display_name="edited")],
        )

    @classmethod
    def execute(cls, model, source, target, negative, source_cfg, target_cfg, latent, steps, scheduler, n_max,
                n_min, n_avg, seed) -> io.NodeOutput:
        guider = flowedit_guider(model, source, target, negative, source_cfg, target_cfg)
        check_latent_channels(model, latent["samples"])
        check_noise_mask(latent)
        _check_counts(n_max, n_min)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
        sampler = FlowEditKSampler(ops.flow_edit, {"n_max": n_max, "n_min": n_min, "n_avg": n_avg, "seed": seed})
        return io.NodeOutput(run_guider(guider, latent, sampler, sigmas))


NODES = [FlowEditGuider, FlowEditSampler, FlowEdit]
