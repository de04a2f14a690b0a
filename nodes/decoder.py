"""Decoder Inversion: a VAE Encode whose latent the VAE's decoder turns back into the image.

The adapter (`invert_image`) turns ComfyUI's VAE into the `encode` / `decode` callables of
`inversion_ops.decoder`, with the same conventions as `VAE.encode`: pixels cropped exactly as
VAE Encode crops them, alpha dropped, BHWC [0, 1] -> the model's own input space
(`vae.process_input`, [-1, 1] for image VAEs), and the RAW latent returned (scale and shift are
applied later by the sampler's `process_latent_in`, as for VAE Encode's output). It calls
`first_stage_model.encode/decode` directly after `load_models_gpu`, so the decoder's output is
never clamped.
"""
import copy

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..inversion_ops.decoder import METHODS, check_inertial_km
from .ui import convergence_ui

CATEGORY = "inversion/vae"
METHOD_NAMES = ["forward_step", "momentum", "adam_residual", "gradient", "encoder"]
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What step_size = 0 means for each method (inversion_ops defaults).
DEFAULT_STEP = {"forward_step": 0.5, "momentum": 0.5, "adam_residual": 0.01, "gradient": 0.01}


def resolve_precision(vae, method, precision):
    """auto: the VAE's own dtype (no copy of its weights), except fp32 for the gradient method,
    whose backward pass underflows in 16 bit."""
    if precision == "auto":
        return torch.float32 if method == "gradient" else vae.vae_dtype
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def prepare_pixels(vae, image):
    """IMAGE (B, H, W, C) in [0, 1] -> the model's input (B, C, H, W), cropped as VAE Encode crops."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be an IMAGE batch (B, H, W, 3), got {shape}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values: decoder inversion needs finite pixels")
    cropped = vae.vae_encode_crop_pixels(image[..., :3])
    if cropped.shape[1] == 0 or cropped.shape[2] == 0:
        raise ValueError(f"image is {image.shape[2]}x{image.shape[1]} px, smaller than this VAE's "
                         f"downscale factor {vae.spacial_compression_encode()}")
    return vae.process_input(cropped.movedim(-1, 1))


def _model_in(vae, dtype, autograd):
    """The VAE's model in `dtype`; a private copy where the VAE's own must not be touched: another
    dtype, or autograd through weights that ComfyUI created as inference tensors."""
    model = vae.first_stage_model
    inference_weights = any(p.is_inference() for p in model.parameters())
    if dtype == vae.vae_dtype and not (autograd and inference_weights):
        return model
    with torch.inference_mode(False):
        private = copy.deepcopy(model)          # clones outside inference mode are normal tensors
        for p in private.parameters():
            p.requires_grad_(False)             # gradients are taken w.r.t. the latent only
        return private.to(dtype)


def check_method_settings(method, step_size, momentum):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if step_size < 0:
        raise ValueError(f"step_size must be >= 0 (0 = the method's default), got {step_size}")
    if method == "momentum":
        try:
            check_inertial_km(momentum, step_size or DEFAULT_STEP["momentum"])
        except ValueError as e:
            raise ValueError(f"momentum / step_size: {e}") from None


def invert_image(vae, image, method="forward_step", iterations=50, step_size=0.0, momentum=0.3,
                 tolerance=1e-4, precision="auto", callback=None):
    """Decoder inversion of an IMAGE batch through a ComfyUI VAE; returns (raw latent (B, C, h, w)
    float32 on the intermediate device, DecoderInversionInfo). The VAE is left as it came."""
    vae.throw_exception_if_invalid()
    if getattr(vae, "latent_dim", 2) != 2:
        raise ValueError("vae: decoder inversion supports image VAEs (2-D latents), not video or audio VAEs")
    check_method_settings(method, step_size, momentum)
    dtype = resolve_precision(vae, method, precision)
    pixels = prepare_pixels(vae, image)
    comfy.model_management.load_models_gpu([vae.patcher], force_full_load=True)
    model = _model_in(vae, dtype, autograd=method == "gradient")
    pixels = pixels.to(vae.device)

    knobs = {}
    if method != "encoder":
        knobs = dict(iters=iterations, tol=tolerance)
        step = step_size or DEFAULT_STEP[method]
        knobs["lr" if method in ("adam_residual", "gradient") else "rho"] = step
        if method == "momentum":
            knobs["alpha"] = momentum
    z, info = METHODS[method](model.encode, model.decode, pixels, dtype=dtype, callback=callback, **knobs)
    return z.detach().float().to(comfy.model_management.intermediate_device()), info


def _progress(total):
    """Progress bar + ComfyUI's interrupt, after every residual evaluation."""
    bar = comfy.utils.ProgressBar(total)

    def on_evaluation(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(d["i"] + 1, total)
    return on_evaluation


class DecoderInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DecoderInversion",
            display_name="Decoder Inversion (VAE Encode, exact)",
            category=CATEGORY,
            description=(
                "Encodes images into a LATENT that the VAE's decoder turns back into the same images, more "
                "exactly than VAE Encode: it starts from the encoder's latent and iterates until "
                "decode(latent) reproduces each image (Hong et al., NeurIPS 2024). The gradient-free "
                "methods use forward passes only. Output on the same scale as VAE Encode (raw latent), "
                "usable by every core node. Images are cropped to the VAE's downscale multiple exactly as "
                "VAE Encode crops them."),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder should reproduce the image. It is not modified."),
                io.Image.Input("image", tooltip="Images to invert (a batch is inverted sample by sample in one run)."),
                io.Combo.Input("method", options=METHOD_NAMES, default="forward_step", tooltip=(
                    "forward_step: z <- z - step*(E(D(z)) - E(x)), no gradients (fast, low memory). "
                    "momentum: the same with inertia (inertial Krasnoselskii-Mann, Theorem 2). "
                    "adam_residual: the authors' released variant (Adam on that residual). "
                    "gradient: Adam on ||D(z) - x||^2 with backpropagation (slow, high memory). "
                    "encoder: plain VAE Encode (the baseline).")),
                io.Int.Input("iterations", default=50, min=1, max=2000, tooltip=(
                    "Maximum updates per image; each costs one decode and one encode "
                    "(gradient: one decode and its backward pass). Ignored by encoder.")),
                io.Float.Input("step_size", default=0.0, min=0.0, max=10.0, step=0.001, round=False, tooltip=(
                    "0 = the method's default: step 0.5 for forward_step and momentum (must stay below 2 for "
                    "an encoder that inverts the decoder), Adam learning rate 0.01 for adam_residual and "
                    "gradient.")),
                io.Float.Input("momentum", default=0.3, min=0.0, max=0.99, step=0.01, round=False, tooltip=(
                    "Inertia alpha of the momentum method; with step s it must satisfy "
                    "s/2*(1 - alpha + 2 alpha^2) < (1 - alpha)^2 (defaults 0.3 / 0.5 do, with a 2x margin).")),
                io.Float.Input("tolerance", default=1e-4, min=0.0, max=10.0, step=0.00001, round=False, tooltip=(
                    "An image stops when the RMS per element of its residual E(D(z)) - E(x) is at most this, "
                    "in raw latent units (gradient: of D(z) - x, in the VAE's [-1, 1] pixel units). "
                    "0 = run every iteration.")),
                io.Combo.Input("precision", options=["auto", *PRECISIONS], default="auto", tooltip=(
                    "dtype of the model and of the latent being updated. auto: the VAE's own dtype "
                    "(fp32 for gradient). Any other dtype runs on a temporary copy of the VAE's weights.")),
            ],
            outputs=[io.Latent.Output(tooltip="Raw latent, as VAE Encode returns it.")],
        )

    @classmethod
    def execute(cls, vae, image, method, iterations, step_size, momentum, tolerance, precision):
        evaluations = 1 if method == "encoder" else iterations + 1
        z, info = invert_image(vae, image, method, iterations, step_size, momentum, tolerance, precision,
                               callback=_progress(evaluations))
        residual = info.best_residual
        units = "pixel RMS" if method == "gradient" else "latent RMS"
        summary = (f"{method}: {max(info.sample_iterations)} iterations, residual "
                   f"{max(residual):.3g} {units}, converged {sum(info.converged)}/{len(residual)}")
        ui = convergence_ui(f"Decoder inversion ({method})", info.residuals, "evaluation",
                            f"residual ({units})", summary=summary,
                            final_residual=[float(r) for r in residual],
                            iterations=[int(i) for i in info.sample_iterations])
        return io.NodeOutput({"samples": z}, ui=ui)


NODES = [DecoderInversion]
