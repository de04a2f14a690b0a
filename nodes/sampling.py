"""Plumbing shared by every sampler-based node: the SAMPLER that runs an inversion function, the
guider-driven run of the one-node versions, the NOISE that starts at an inverted latent, the inputs and
round-trip text they share, and input checks. Everything is derived from the model's `model_sampling`;
no model family is named. Which inverse each sampler takes is in nodes/inverses.py.
"""
import itertools

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..inversion_ops.common import reachable_tolerance


def round_trip_recipe(sampler="the same sampler"):
    """How to regenerate from an inverted latent: one text for every inversion node."""
    return (
        f"Regenerate with the same model, conditioning, cfg, scheduler, steps and denoise and {sampler}, "
        "starting from the inverted latent with no added noise. Universal (every model): "
        "SamplerCustomAdvanced with noise = Inverted Noise(model, inverted latent), guider = CFGGuider, "
        "sigmas = BasicScheduler, latent_image = the inverted latent. EPS / V models, or any model at "
        "denoise < 1: also KSampler (Advanced) with add_noise disabled, or SamplerCustom with add_noise off. "
        "Flow models at full denoise (sigma_max = 1) need the universal recipe: with add_noise off, ComfyUI "
        "multiplies the start latent by 1 - sigma = 0. dpm_2 and uni_pc: regenerate with BasicScheduler's sigmas "
        "(SamplerCustom / SamplerCustomAdvanced); KSampler drops their penultimate sigma.")


def inversion_node_inputs(sampler_tooltip):
    """The inputs every one-node inversion shares: what the user will regenerate with."""
    return [
        io.Model.Input("model", tooltip="The model you will regenerate with (its patches apply)."),
        io.Conditioning.Input("positive", tooltip="The positive conditioning you will regenerate with."),
        io.Conditioning.Input("negative", tooltip="The negative conditioning you will regenerate with."),
        io.Latent.Input("latent", tooltip="The latent to invert (VAE Encode of your image)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                       tooltip=sampler_tooltip),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       tooltip="The scheduler you will regenerate with."),
    ]


def check_latent_channels(model, samples, input_name="latent"):
    """The latent must have this model's channels and dims: (B, C, H, W) for image models, (B, C, T, H, W)
    for video models (their latent format says how many latent dimensions they have)."""
    latent_format = model.get_model_object("latent_format")
    expected, dims = latent_format.latent_channels, getattr(latent_format, "latent_dimensions", 2)
    layout = "(B, {c}, H, W)" if dims == 2 else "(B, {c}, T, H, W)"
    if samples.ndim != 2 + dims or samples.shape[1] != expected:
        raise ValueError(f"{input_name} has shape {tuple(samples.shape)}, but this model works on "
                         f"{expected}-channel latents {layout.format(c=expected)}: encode the image or video "
                         f"with this model's VAE.")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{input_name} contains NaN or infinite values.")


def check_noise_mask(latent, input_name="latent"):
    """A noise_mask (SetLatentNoiseMask) must be one the latent can take as ComfyUI resizes masks
    (comfy.utils.reshape_mask): finite values in [0, 1], the latent's aspect ratio, and for image
    latents one mask or one per latent of the batch (ComfyUI would silently tile or cut the rest)."""
    mask, samples = latent.get("noise_mask"), latent["samples"]
    if mask is None:
        return
    shape, (height, width) = tuple(samples.shape), samples.shape[-2:]
    if mask.ndim < 2 or mask.ndim > samples.ndim or mask.numel() == 0:
        raise ValueError(f"{input_name}'s noise_mask has shape {tuple(mask.shape)}, which does not fit a latent of "
                         f"shape {shape}: connect a MASK of the image's size to Set Latent Noise Mask.")
    mask_h, mask_w = mask.shape[-2:]
    if abs(mask_h * width - height * mask_w) > max(mask_w, width):
        raise ValueError(f"{input_name}'s noise_mask is {mask_h}x{mask_w} (height x width) but the latent is "
                         f"{height}x{width}: the mask must have the image's aspect ratio (resize or crop it).")
    masks = mask.numel() // (mask_h * mask_w)
    if samples.ndim == 4 and masks not in (1, samples.shape[0]):
        raise ValueError(f"{input_name}'s noise_mask holds {masks} masks but the latent batch has "
                         f"{samples.shape[0]}: give one mask for the batch or one per latent.")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{input_name}'s noise_mask must hold values in [0, 1] (1 = edit, 0 = keep the source).")


def masked_start(model_sampling, sigma, noise, latent_image, kept):
    """(noise, latent_image) for a masked run: it starts where InversionKSampler starts from (noise,
    latent_image), while ComfyUI's inpainting (KSamplerX0Inpaint) keeps `kept` outside the mask.
    noise_scaling is affine in (noise, latent): its two weights are probed at `sigma`."""
    start = _EndSafeModelSampling(model_sampling).noise_scaling(sigma, noise, latent_image)
    sigma = torch.as_tensor(sigma, dtype=start.dtype, device=start.device).reshape(1)
    unit, zero = torch.ones_like(sigma).reshape(1, 1), torch.zeros_like(sigma).reshape(1, 1)
    noise_w = float(model_sampling.noise_scaling(sigma, unit, zero))
    kept_w = float(model_sampling.noise_scaling(sigma, zero, unit))
    if noise_w == 1.0 and kept_w == 0.0:
        return start.clone(), kept                 # a flow model at sigma = 1: exactly the start
    return (start - kept_w * kept) / noise_w, kept


def latent_weight(model_sampling, sigma):
    """How much of the input latent ComfyUI's noise_scaling keeps at `sigma` (0 for flow at 1).
    Probed on sigma's own device, so it works wherever ComfyUI put the schedule."""
    sigma = torch.as_tensor(sigma).reshape(1).float()   # cpu: a number stays on the host; a tensor keeps its device
    return float(model_sampling.noise_scaling(sigma, sigma.new_zeros(1), sigma.new_ones(1)))


class _EndSafeModelSampling:
    """A view of model_sampling that keeps the latent where ComfyUI's scaling would lose it:
    a flow model's sigma = 1 keeps (1 - sigma) * latent = 0 of a start latent given with zero noise
    (add_noise off: the latent IS the inverted noise), and divides by 1 - sigma = 0 at the end."""

    def __init__(self, model_sampling):
        self._inner = model_sampling

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        if latent_weight(self._inner, sigma) == 0.0 and not bool(noise.any()):
            return latent_image.clone()
        return self._inner.noise_scaling(sigma, noise, latent_image, max_denoise)

    def inverse_noise_scaling(self, sigma, latent):
        if latent_weight(self._inner, sigma) == 0.0:
            return latent
        return self._inner.inverse_noise_scaling(sigma, latent)


class _InnerModelView:
    def __init__(self, inner_model):
        self._inner, self.model_sampling = inner_model, _EndSafeModelSampling(inner_model.model_sampling)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _InterruptibleModel:
    """The guider as KSAMPLER sees it, checking ComfyUI's interrupt before every model call, so the
    solvers' inner iterations stop too; its inner model's scaling is end-safe."""

    def __init__(self, guider):
        self._inner, self.inner_model = guider, _InnerModelView(guider.inner_model)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return self._inner(*args, **kwargs)


class InversionKSampler(comfy.samplers.KSAMPLER):
    """ComfyUI's KSAMPLER for an inversion function, `InversionKSampler(fn, options)`: previews,
    progress, masks and wrappers as usual. It differs in the flow sigma = 1 ends, in checking the
    interrupt at every model call and every step (some steps call no model), and in raising a
    `tolerance` option to what the model's compute dtype can reach (a 16-bit model's rounding sets a
    floor under the residual; below it every step would run to its cap)."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        reports = itertools.count()

        def on_step(step, denoised, x, total_steps):
            # refine passes and shooting report past the last step: one bar counts reports, its total growing
            comfy.model_management.throw_exception_if_processing_interrupted()
            done = next(reports)
            if callback is not None:
                callback(done, denoised, x, max(total_steps, done + 1))
        run = self
        if "tolerance" in self.extra_options:   # a new KSAMPLER for this run: this object is shared
            tolerance = reachable_tolerance(self.extra_options["tolerance"], compute_dtype(model_wrap.inner_model))
            run = comfy.samplers.KSAMPLER(self.sampler_function, {**self.extra_options, "tolerance": tolerance})
        return comfy.samplers.KSAMPLER.sample(run, _InterruptibleModel(model_wrap), sigmas, extra_args, on_step,
                                              noise, latent_image, denoise_mask, disable_pbar)


def compute_dtype(base_model):
    """The dtype a ComfyUI model computes in: its manual-cast dtype where it has one (fp8 weights, say),
    else its weights' dtype; float32 for anything else that samples."""
    dtype = getattr(base_model, "manual_cast_dtype", None)
    if dtype is None and hasattr(base_model, "get_dtype"):
        dtype = base_model.get_dtype()
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def run_sampler(model, positive, negative, cfg, latent, sampler, sigmas, noise=None, seed=0):
    """What SamplerCustom does, for the one-node versions: conds, cfg, patches and ControlNet go
    through ComfyUI's CFGGuider, so whatever the user's graph patched into the model applies.
    Returns a new LATENT dict; the input dict and tensor are untouched."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return run_guider(guider, latent, sampler, sigmas, noise, seed)


def run_guider(guider, latent, sampler, sigmas, noise=None, seed=0):
    """What SamplerCustomAdvanced does with `guider`, the latent's noise_mask included; a new LATENT dict."""
    model = guider.model_patcher
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if noise is None:
        noise = torch.zeros_like(samples)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1, {})
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = to_intermediate(out)
    return result


def to_intermediate(samples):
    """A LATENT's tensor where core nodes put theirs: the intermediate device, and the intermediate
    dtype where ComfyUI has one (newer versions; fp16 under --fp16-intermediates, else float32)."""
    dtype = getattr(comfy.model_management, "intermediate_dtype", lambda: torch.float32)()
    return samples.to(device=comfy.model_management.intermediate_device(), dtype=dtype)


def invert_whole_latent(model, positive, negative, cfg, latent, sampler, sigmas):
    """run_sampler over ascending sigmas. A noise_mask would blend the latent back in at every step,
    so the whole latent is inverted."""
    source = {k: v for k, v in latent.items() if k != "noise_mask"}
    return run_sampler(model, positive, negative, cfg, source, sampler, sigmas)


class InvertedNoise:
    """A NOISE for SamplerCustomAdvanced that starts sampling exactly at an inverted latent.

    Needed where ComfyUI discards the latent at the first sigma (a flow model at sigma = 1 keeps
    (1 - sigma) * latent = 0 of it): the inverted noise is returned as the noise there, and
    zero noise elsewhere, so the latent itself is the start, as with add_noise off. Pass the
    same inverted LATENT as latent_image.
    """

    def __init__(self, model, samples):
        self.seed = 0
        self.model_sampling = model.get_model_object("model_sampling")
        self.samples = model.model.process_latent_in(samples)   # the sampler's own latent space

    def generate_noise(self, input_latent):
        latent = input_latent["samples"]
        if self.samples.shape != latent.shape:
            raise ValueError(f"the inverted noise has shape {tuple(self.samples.shape)} but latent_image has "
                             f"{tuple(latent.shape)}: pass the same latent to both")
        if latent_weight(self.model_sampling, self.model_sampling.sigma_max) == 0.0:
            return self.samples.clone().to(device=latent.device, dtype=latent.dtype)
        return torch.zeros_like(latent)
