"""Tree-Ring watermarks (Wen et al., NeurIPS 2023): a NOISE for SamplerCustomAdvanced that carries a keyed ring
pattern, and a detector that inverts an image back to its noise with Invert Latent's exact (or naive) inversion.
The maths is in inversion_ops.watermark; this module maps ComfyUI's latents to and from unit noise.
"""
import math

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..inversion_ops import watermark
from ..inversion_ops.common import StepLog
from .decoder import invert_image
from .exact import inversion_sampler
from .inverses import check_invertible_sampler
from .sampling import check_latent_channels, invert_whole_latent
from .sigmas import inversion_sigmas
from .ui import CATEGORY, schema, tree_ring_ui

ENCODERS = ("vae_encode", "decoder_inversion")

TOOLTIPS = {
    "key_seed": "The secret key: the ring values come from this seed (identical on every machine). Detection "
                "needs the same key_seed, channel and radius.",
    "channel": f"The latent channel that carries the rings (the paper uses {watermark.CHANNEL} for SD's 4 channels).",
    "radius": f"Rings inside this radius of the centred 2-D FFT (frequency units; the paper uses "
              f"{watermark.RADIUS} on 64x64 latents, i.e. 512 px SD images). Must be below half the latent size.",
    "positive": "An empty prompt (the paper's setting), or the prompt used, if known.",
    "sampler_name": "The sampler to invert (any deterministic one). Best: the one that generated the image.",
    "method": "exact: Invert Latent's exact inversion of sampler_name (stronger detection). naive: DDIM inversion, "
              "one model call per step.",
    "false_positive_rate": "detected = p_value below this: the share of clean images flagged.",
    "encoder": "How the image becomes a latent: vae_encode (VAE Encode) or decoder_inversion (Decoder Inversion: "
               "more exact, slower).",
    "p_value": "The chance that noise without this watermark comes this close to the key.",
}
DETECT_DESCRIPTION = (
    "Checks whether an image or latent was generated from Tree-Ring Noise with this key: it inverts it to its "
    "noise with Invert Latent's inversion of sampler_name (exact or naive) and compares the ring region of its "
    "spectrum with the key. Outputs the distance, a p-value under the null 'the noise is Gaussian, without this "
    "watermark', and the verdict at false_positive_rate. The paper's detection setting is an empty prompt at "
    "cfg 1: connect an empty-prompt CLIP Text Encode to positive and negative. For a batch, the outputs are "
    "those of the image with the lowest p-value (each image's values are shown on the node).")


class TreeRingNoiseObject:
    """ComfyUI's seeded Gaussian noise (as RandomNoise makes it: comfy.sample.prepare_noise, per-sample and
    batch_index aware) with the key's rings in one channel of every sample."""

    def __init__(self, seed, key_seed, channel, radius):
        self.seed, self.key_seed, self.channel, self.radius = seed, key_seed, channel, radius

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        watermark.check_ring_fits(samples.shape, self.channel, self.radius, "latent_image")
        noise = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        return watermark.embed_rings(noise, self.key_seed, self.channel, self.radius)


def unit_noise(model, inverted, sigma):
    """The unit Gaussian noise a sampler turned into the inverted latent at `sigma` (the schedule's top):
    noise_scaling(sigma, n, empty latent) solved for n, as ComfyUI applied it to an empty (zero) latent."""
    model_sampling = model.get_model_object("model_sampling")
    x = model.model.process_latent_in(inverted.float())
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)   # cpu: a number stays on the host
    top = float(model_sampling.sigma_max)
    full = math.isclose(top, float(sigma), rel_tol=1e-5) or float(sigma) > top   # KSAMPLER's max_denoise

    def scaling(noise, latent):
        return model_sampling.noise_scaling(sigma, noise, latent, full)
    offset = scaling(torch.zeros_like(x), model.model.process_latent_in(torch.zeros_like(x)))
    one = torch.ones(1, 1, 1, 1)   # cpu: a scalar probe of noise_scaling beside the host sigma
    gain = scaling(one, torch.zeros_like(one)) - scaling(torch.zeros_like(one), torch.zeros_like(one))
    return (x - offset) / gain


def detection_latent(latent, image, vae, encoder):
    """(raw latent, the input's name) from the LATENT, or the IMAGE through the VAE."""
    if latent is not None and image is not None:
        raise ValueError("connect either latent or image (with vae), not both")
    if latent is not None:
        return latent["samples"], "latent"
    if image is None:
        raise ValueError("nothing to check: connect a latent, or an image and its vae")
    if vae is None:
        raise ValueError("image needs a vae to encode it: connect the vae of the model that made it")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    if encoder == "decoder_inversion":
        return invert_image(vae, image)[0], "image"
    return vae.encode(image[:, :, :, :3]), "image"


def detect_tree_ring(model, positive, negative, sampler_name, scheduler, steps, cfg, method, key_seed, channel,
                     radius, false_positive_rate, latent=None, image=None, vae=None, encoder="vae_encode"):
    """Tree-Ring Detect's work: (distance, p_value, detected) of the image with the lowest p-value, and the ui."""
    sampler, log = check_invertible_sampler(sampler_name), StepLog()
    samples, name = detection_latent(latent, image, vae, encoder)
    check_latent_channels(model, samples, name)
    watermark.check_ring_fits(samples.shape, channel, radius, name)
    sigmas = inversion_sigmas(model, scheduler, steps)
    inverter = inversion_sampler(sampler, method, log=log)
    noise = invert_whole_latent(model, positive, negative, cfg, {"samples": samples}, inverter, sigmas)
    result = watermark.detect(unit_noise(model, noise["samples"], sigmas[-1]), key_seed, channel, radius)
    detected = [bool(p < false_positive_rate) for p in result["p_value"]]
    best = int(result["p_value"].argmin())
    return (float(result["distance"][best]), float(result["p_value"][best]), detected[best],
            tree_ring_ui(log, method, sampler, result, detected, false_positive_rate))


class TreeRingNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="TreeRingNoise",
            search_aliases=["watermark noise", "tree ring", "invisible watermark"],
            display_name="Tree-Ring Noise (watermark)",
            category=f"{CATEGORY}/watermark",
            description=(
                "A NOISE for SamplerCustomAdvanced: ComfyUI's seeded Gaussian noise with a secret ring pattern "
                "written into the Fourier spectrum of one latent channel (Tree-Ring, Wen et al. 2023). The image "
                "looks like any other; Tree-Ring Detect finds the key again by inverting the image to its noise."),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed, as RandomNoise's noise_seed."),
                io.Int.Input("key_seed", default=watermark.KEY_SEED, min=0, max=0xffffffffffffffff,
                             tooltip=TOOLTIPS["key_seed"]),
                io.Int.Input("channel", default=watermark.CHANNEL, min=0, max=127, tooltip=TOOLTIPS["channel"]),
                io.Int.Input("radius", default=watermark.RADIUS, min=1, max=512, tooltip=TOOLTIPS["radius"]),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, seed, key_seed, channel, radius) -> io.NodeOutput:
        return io.NodeOutput(TreeRingNoiseObject(seed, key_seed, channel, radius))


class TreeRingDetect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        t = TOOLTIPS
        return schema(
            node_id="TreeRingDetect",
            search_aliases=["watermark detection", "tree ring", "verify watermark", "provenance"],
            display_name="Tree-Ring Detect (watermark)",
            category=f"{CATEGORY}/watermark",
            is_output_node=True,   # its verdict is shown on the node: it runs with nothing connected
            description=DETECT_DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip="The model that generated the image."),
                io.Conditioning.Input("positive", tooltip=t["positive"]),
                io.Conditioning.Input("negative", tooltip="An empty prompt."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip=t["sampler_name"]),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The scheduler of the inversion (best: the generation's)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Inversion steps (the paper uses 50)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="1 with an empty prompt: the paper's detection setting."),
                io.Combo.Input("method", options=["exact", "naive"], default="exact", tooltip=t["method"]),
                io.Int.Input("key_seed", default=watermark.KEY_SEED, min=0, max=0xffffffffffffffff,
                             tooltip=t["key_seed"]),
                io.Int.Input("channel", default=watermark.CHANNEL, min=0, max=127, tooltip=t["channel"]),
                io.Int.Input("radius", default=watermark.RADIUS, min=1, max=512, tooltip=t["radius"]),
                io.Float.Input("false_positive_rate", default=watermark.FALSE_POSITIVE_RATE, min=1e-12, max=0.5,
                               step=0.001, round=False, tooltip=t["false_positive_rate"]),
                io.Latent.Input("latent", optional=True, tooltip="The latent to check, or connect image and vae."),
                io.Image.Input("image", optional=True, tooltip="The image to check (with vae)."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE of the model that generated the image."),
                io.Combo.Input("encoder", options=list(ENCODERS), default="vae_encode", optional=True,
                               tooltip=t["encoder"]),
            ],
            outputs=[
                io.Float.Output(display_name="distance", tooltip="Mean |FFT(noise) - key| over the rings."),
                io.Float.Output(display_name="p_value", tooltip=t["p_value"]),
                io.Boolean.Output(display_name="detected", tooltip="p_value < false_positive_rate."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, sampler_name, scheduler, steps, cfg, method, key_seed, channel,
                radius, false_positive_rate, latent=None, image=None, vae=None, encoder="vae_encode"):
        *outputs, ui = detect_tree_ring(model, positive, negative, sampler_name, scheduler, steps, cfg, method,
                                        key_seed, channel, radius, false_positive_rate, latent, image, vae, encoder)
        return io.NodeOutput(*outputs, ui=ui)


NODES = [TreeRingNoise, TreeRingDetect]
