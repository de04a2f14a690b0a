"""The ascending sigma schedule that every inversion sampler in this pack runs over."""
import comfy.samplers
import torch
from comfy_api.latest import io

from .ui import CATEGORY, schema


def inversion_sigmas(model, scheduler, steps, denoise=1.0):
    """The sampling schedule ComfyUI's BasicScheduler gives, reversed: ascending from 0.

    Partial inversion (denoise < 1) keeps the last `steps` sigmas of a longer schedule, exactly as
    BasicScheduler does, so a sampler run with the same settings retraces the same sigmas.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler must be one of {comfy.samplers.SCHEDULER_NAMES}, got {scheduler!r}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):].flip(0).to(torch.float32)


class InversionSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="InversionSigmas",
            search_aliases=["flip sigmas", "reverse sigmas", "ascending sigmas"],
            display_name="Inversion Sigmas",
            category=f"{CATEGORY}/sigmas",
            description=(
                "The model's sampling schedule reversed (ascending from 0), for the inversion samplers "
                "in SamplerCustom / SamplerCustomAdvanced. Regenerate with BasicScheduler and the same "
                "scheduler, steps and denoise."),
            inputs=[
                io.Model.Input("model", tooltip="The model whose model_sampling defines the schedule."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="The scheduler you will regenerate with."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The steps you will regenerate with."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Invert only this fraction of the schedule (partial inversion)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, scheduler, steps, denoise) -> io.NodeOutput:
        return io.NodeOutput(inversion_sigmas(model, scheduler, steps, denoise))
