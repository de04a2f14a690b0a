"""Plumbing shared by every sampler-based node: ComfyUI's model wrapper -> `denoise(x, sigma)`,
SAMPLER objects for SamplerCustom / SamplerCustomAdvanced, and the guider-driven run used by
the one-node convenience versions. Everything is derived from the model's `model_sampling`.
"""
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

CATEGORY = "inversion"

# ComfyUI sampler names whose update is deterministic and has an inverse here. "ddim" runs
# ComfyUI's sample_euler, so it inverts exactly like "euler".
INVERTIBLE_SAMPLERS = ("euler", "ddim", "dpmpp_2m")


def check_invertible_sampler(sampler_name):
    """Refuse sampler names with no deterministic inverse, saying why."""
    if sampler_name in INVERTIBLE_SAMPLERS:
        return "dpmpp_2m" if sampler_name == "dpmpp_2m" else "euler"
    stochastic = ("ancestral" in sampler_name or "sde" in sampler_name
                  or sampler_name in ("ddpm", "lcm", "er_sde", "seeds_2", "seeds_3", "sa_solver_pece"))
    why = ("it adds fresh random noise at every step, so no single starting latent reproduces an image"
           if stochastic else "this pack has no exact inverse for its update")
    raise ValueError(f"sampler_name {sampler_name!r} cannot be inverted: {why}. "
                     f"Use one of {', '.join(INVERTIBLE_SAMPLERS)} for both inversion and regeneration.")


def check_ascending_sigmas(sigmas):
    if len(sigmas) < 2 or float(sigmas[0]) >= float(sigmas[-1]):
        raise ValueError("sigmas must ascend from the least noisy (an inversion walks up the schedule): "
                         "connect Inversion Sigmas, or FlipSigmas after BasicScheduler.")


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
    expected = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4 or samples.shape[1] != expected:
        raise ValueError(f"{input_name} has shape {tuple(samples.shape)}, but this model works on "
                         f"{expected}-channel latents (B, {expected}, H, W): encode the image with this "
                         f"model's VAE.")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{input_name} contains NaN or infinite values.")


def _latent_weight(model_sampling, sigma, max_denoise=False):
    """How much of the input latent ComfyUI's noise_scaling keeps at `sigma` (0 for flow at 1)."""
    one = torch.ones(1)
    return float(model_sampling.noise_scaling(torch.as_tensor(sigma).float(), torch.zeros(1), one, max_denoise))


def start_state(model_sampling, sigma, noise, latent_image, max_denoise):
    """ComfyUI's noise_scaling, except where it would discard the latent the user gave us.

    A flow model at sigma = 1 keeps (1 - sigma) * latent = 0 of it; with add_noise off (all-zero
    noise) the only meaningful start is the latent itself, e.g. noise inverted by this pack.
    """
    if _latent_weight(model_sampling, sigma, max_denoise) == 0.0 and not bool(noise.any()):
        return latent_image.clone()
    return model_sampling.noise_scaling(sigma, noise, latent_image, max_denoise)


def end_state(model_sampling, sigma, x):
    """ComfyUI's inverse_noise_scaling, except at a flow model's sigma = 1, where it divides by
    1 - sigma = 0: return the raw state (pure noise) there instead of NaN."""
    if _latent_weight(model_sampling, sigma) == 0.0:
        return x
    return model_sampling.inverse_noise_scaling(sigma, x)


def make_denoiser(model_k, extra_args):
    """`denoise(x, sigma) -> x0` over ComfyUI's wrapped model (CFG, conds and patches applied).

    Every model call is a point where ComfyUI's interrupt is honoured, so inner solver loops stop too.
    """
    def denoise(x, sigma):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        return model_k(x, sigma, **extra_args)
    return denoise


def step_callback(callback, total_steps):
    """Adapt an inversion function's k-diffusion style callback dict to ComfyUI's preview/progress."""
    if callback is None:
        return None

    def on_step(d):
        denoised = d.get("denoised")
        callback(d["i"], denoised if denoised is not None else d["x"], d["x"], total_steps)
    return on_step


class FunctionSampler(comfy.samplers.KSAMPLER):
    """A SAMPLER that runs `run(denoise, x, sigmas, callback) -> (x, info)` from inversion_ops.

    Like KSAMPLER (inpainting masks, previews, progress), plus the flow-model sigma = 1 handling of
    `start_state` / `end_state`. The last run's info record is kept in `last_info` for the node's ui.
    """

    def __init__(self, run):
        super().__init__(sampler_function=None)
        self.run = run
        self.last_info = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image = latent_image
        model_k.noise = noise
        model_sampling = model_wrap.inner_model.model_sampling
        x = start_state(model_sampling, sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        with torch.no_grad():   # like k-diffusion's samplers; gradient methods re-enable it inside
            x, self.last_info = self.run(make_denoiser(model_k, extra_args), x, sigmas,
                                         step_callback(callback, len(sigmas) - 1))
        return end_state(model_sampling, sigmas[-1], x)


def run_sampler(model, positive, negative, cfg, latent, sampler, sigmas, noise=None, seed=0):
    """What SamplerCustom does, for the one-node versions: conds, cfg, patches and ControlNet go
    through ComfyUI's CFGGuider, so whatever the user's graph patched into the model applies.
    Returns a new LATENT dict; the input dict and tensor are untouched."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    if noise is None:
        noise = torch.zeros_like(samples)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1, {})
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = out.to(comfy.model_management.intermediate_device())
    return result


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
        if _latent_weight(self.model_sampling, self.model_sampling.sigma_max, True) == 0.0:
            return self.samples.clone().to(latent.dtype)
        return torch.zeros_like(latent)
