"""Decoder Inversion: a VAE Encode whose latent the VAE's decoder turns back into the image.

The adapter (`invert_image`) turns ComfyUI's VAE into the `encode` / `decode` callables of
`inversion_ops.decoder`, with the same conventions as `VAE.encode`: pixels cropped exactly as
VAE Encode crops them, alpha dropped, BHWC [0, 1] -> the model's own input space
(`vae.process_input`, [-1, 1] for image VAEs), and the RAW latent returned (scale and shift are
applied later by the sampler's `process_latent_in`, as for VAE Encode's output). It calls
`first_stage_model.encode/decode` directly after `load_models_gpu`, so the decoder's output is
never clamped. Defaults and policy live in `inversion_ops.decoder`.
"""
import copy
import logging

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..inversion_ops.common import StepLog
from ..inversion_ops.decoder import (
    AUTO_DTYPE, DEFAULT_STEP, MAX_ITERATIONS, METHOD, METHOD_NAMES, METHODS, MOMENTUM, STEP_OPTION, TOLERANCE,
    auto_momentum_step, check_inertial_km, checkpointed, hybrid_finish_dtype,
)
from .sampling import to_intermediate
from .ui import decoder_inversion_ui, schema

CATEGORY = "inversion/vae"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TILE, TILE_OVERLAP = 512, 64   # pixels, as VAE Encode's tiled fallback

DESCRIPTION = (
    "Encodes images into a LATENT that the VAE's decoder turns back into the same images, more exactly than "
    "VAE Encode: it starts from the encoder's latent and iterates until decode(latent) reproduces each image "
    "(Hong et al., NeurIPS 2024). The gradient-free methods use forward passes only. Output on the same scale "
    "as VAE Encode (raw latent), usable by every core node. Images are cropped to the VAE's downscale "
    "multiple exactly as VAE Encode crops them.")
TOOLTIPS = {
    "vae": "The VAE whose decoder should reproduce the image. It is not modified.",
    "image": "Images to invert (a batch is inverted sample by sample in one run).",
    "method": (
        "hybrid: a few forward steps, then Adam on ||D(z) - x||^2 with the decoder's backward pass recomputed "
        "in segments (most exact per second, moderate memory). "
        "forward_step: z <- z - step*(E(D(z)) - E(x)), no gradients (fast, low memory). "
        "momentum: the same with inertia (inertial Krasnoselskii-Mann, Theorem 2). "
        "adam_residual: the authors' released variant (Adam on that residual). "
        "gradient: Adam on ||D(z) - x||^2 with backpropagation (slow, high memory). "
        "encoder: plain VAE Encode (the baseline)."),
    "max_iterations": (
        "Maximum updates per image; each costs one decode and one encode "
        "(gradient: one decode and its backward pass). Ignored by encoder."),
    "step_size": (
        f"0 = the method's default: step {DEFAULT_STEP['forward_step']} for forward_step and momentum (must stay "
        f"below 2 for an encoder that inverts the decoder), Adam learning rate {DEFAULT_STEP['adam_residual']} "
        f"for adam_residual and gradient, {DEFAULT_STEP['hybrid']} for hybrid's finish. momentum: the default "
        "step, shrunk where the momentum input needs a smaller one to satisfy Theorem 2."),
    "momentum": (
        "Inertia alpha of the momentum method; with step_size 0 the step is chosen to satisfy Theorem 2, a "
        "step s you set must satisfy "
        f"s/2*(1 - alpha + 2 alpha^2) < (1 - alpha)^2 (the defaults {MOMENTUM} / {DEFAULT_STEP['momentum']} "
        "do)."),
    "tolerance": (
        "An image stops when the RMS per element of its residual E(D(z)) - E(x) is at most this, in raw "
        "latent units (gradient and hybrid's finish: of D(z) - x, in the VAE's [-1, 1] pixel units). 0 = run every "
        "iteration."),
    "precision": (
        "dtype the VAE's model runs in; the latent being updated is float32 whatever this is. auto: fp32, "
        "the most exact, except hybrid's gradient finish, which runs in bf16 where the device computes bf16 "
        "natively (half the memory). A dtype other than the VAE's own runs on a temporary copy of its weights."),
}


def resolve_precision(vae, method, precision):
    """The dtype the VAE's model runs in; auto is AUTO_DTYPE for every method."""
    if precision == "auto":   # see docs/results.md#auto-dtype
        return AUTO_DTYPE
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def prepare_pixels(vae, image):
    """IMAGE (B, H, W, C) in [0, 1] -> the model's input, cropped as VAE Encode crops: (B, C, H, W) for an
    image VAE; for a video VAE the frames are one clip, (1, C, T, H, W), as VAE Encode makes them."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be an IMAGE batch (B, H, W, 3), got {shape}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values: decoder inversion needs finite pixels")
    cropped = vae.vae_encode_crop_pixels(image[..., :3])
    if cropped.shape[1] == 0 or cropped.shape[2] == 0:
        raise ValueError(f"image is {image.shape[2]}x{image.shape[1]} px, smaller than this VAE's "
                         f"downscale factor {vae.spacial_compression_encode()}")
    pixels = cropped.movedim(-1, 1)
    if getattr(vae, "latent_dim", 2) == 3:
        pixels = pixels.unsqueeze(2) if getattr(vae, "not_video", False) else pixels.movedim(1, 0).unsqueeze(0)
    return vae.process_input(pixels)


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


def method_options(method, max_iterations, step_size, momentum, tolerance):
    """The node's inputs as `inversion_ops.decoder` options; errors name the node's inputs."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0 (0 = the method's default), got {step_size}")
    if not max_iterations >= 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (RMS per element of the residual), got {tolerance}")
    if method == "encoder":
        return dict(tolerance=tolerance)
    options = dict(max_iterations=max_iterations, tolerance=tolerance,
                   **{STEP_OPTION[method]: step_size or DEFAULT_STEP[method]})
    if method == "momentum":
        options["rho"] = step_size or auto_momentum_step(momentum)
        try:
            check_inertial_km(momentum, options["rho"])
        except ValueError as e:
            raise ValueError(f"momentum / step_size: {e}") from None
        options["alpha"] = momentum
    return options


def invert_image(vae, image, method=METHOD, max_iterations=MAX_ITERATIONS, step_size=0.0, momentum=MOMENTUM,
                 tolerance=TOLERANCE, precision="auto", callback=None, images_per_run=None, tile=None):
    """Decoder inversion of an IMAGE batch through a ComfyUI VAE; returns (raw latent (B, C, h, w) on the
    intermediate device, the StepLog of every evaluation, which `callback` also gets). The VAE is left
    as it came. Like VAE Encode, the batch is split by free memory, and a run that still runs out of
    memory is redone in overlapping tiles of `TILE` pixels. images_per_run and tile force either."""
    vae.throw_exception_if_invalid()
    if getattr(vae, "latent_dim", 2) not in (2, 3):
        raise ValueError("vae: decoder inversion supports image and video VAEs, not audio VAEs (1-D latents)")
    options = method_options(method, max_iterations, step_size, momentum, tolerance)
    dtype = resolve_precision(vae, method, precision)
    pixels = prepare_pixels(vae, image)
    batch = images_per_run or _images_per_run(vae, pixels, dtype)
    finish_dtype = hybrid_finish_dtype(dtype, vae.device, precision == "auto") if method == "hybrid" else dtype
    model = _model_in(vae, dtype, method == "gradient" or (method == "hybrid" and finish_dtype == dtype))
    if method == "hybrid":   # the finish's VJP holds one segment's activations at a time, in bf16 where native
        finish = checkpointed(model if finish_dtype == dtype else _model_in(vae, finish_dtype, True))
        options = dict(options, finish_decode=finish.decode, finish_dtype=finish_dtype)
    evaluations = {"encoder": 1, "hybrid": max_iterations + 2}.get(method, max_iterations + 1)
    if tile is None:
        runs = -(-pixels.shape[0] // batch)
        run = _Runs(METHODS[method], model, vae.device, dtype, options, _progress(runs * evaluations, callback))
        try:
            z = torch.cat([run(pixels[k:k + batch]) for k in range(0, pixels.shape[0], batch)])
            return to_intermediate(z), StepLog.join(run.logs)
        except comfy.model_management.OOM_EXCEPTION:
            if pixels.ndim == 5:
                raise RuntimeError("Decoder Inversion ran out of memory on this video: invert fewer frames or "
                                   "a smaller size (video is not tiled)") from None
            logging.warning("Decoder Inversion ran out of memory: retrying in tiles of %d px", TILE)
    tile = tile or TILE
    overlap = min(TILE_OVERLAP, tile // 4)
    tiles = pixels.shape[0] * comfy.utils.get_tiled_scale_steps(pixels.shape[3], pixels.shape[2], tile, tile, overlap)
    run = _Runs(METHODS[method], model, vae.device, dtype, options, _progress(tiles * evaluations, callback))
    z = comfy.utils.tiled_scale(pixels, run, tile, tile, overlap,
                                upscale_amount=1 / _encoded_ratio(model, pixels, vae.device, dtype),
                                out_channels=vae.latent_channels, output_device=pixels.device)
    return to_intermediate(z), StepLog.join(run.logs)


def _encoded_ratio(model, pixels, device, dtype):
    """Pixels per latent cell as the encoder outputs them: spacial_compression_encode() does not count a
    packed latent's 2x2 (FLUX.2's taef2 reports 8 and encodes at 16)."""
    side = min(64, pixels.shape[-2], pixels.shape[-1])
    with torch.no_grad():
        z = model.encode(pixels[:1, :, :side, :side].to(device, dtype))
    return side / z.shape[-1]


class _Runs:
    """One decoder inversion per call (a chunk of the batch, or a tile), its StepLog kept; the callback
    sees the evaluations of all of them counted on, as one progress bar."""

    def __init__(self, method, model, device, dtype, options, callback):
        self.method, self.model, self.device, self.dtype, self.options = method, model, device, dtype, options
        self.callback, self.logs, self.done = callback, [], 0

    def __call__(self, pixels):
        log, offset = StepLog(), self.done
        self.logs.append(log)

        def counted_on(d):
            log(d)
            self.done = offset + d["i"] + 1
            if self.callback is not None:
                self.callback({**d, "i": offset + d["i"]})
        z = self.method(self.model.encode, self.model.decode, pixels.to(self.device), counted_on, dtype=self.dtype,
                        **self.options)
        return z.detach().to(pixels.device)


def _images_per_run(vae, pixels, dtype):
    """How many images go through at once, chosen as VAE Encode chooses: free memory over one image's
    need (decode and encode run one after the other, so the larger of ComfyUI's two estimates)."""
    ratio = vae.spacial_compression_encode()
    one_image = (1, *pixels.shape[1:])
    frames = (1,) if pixels.ndim == 5 else ()   # ComfyUI's video estimates scale with H and W only
    one_latent = (1, vae.latent_channels, *frames, pixels.shape[-2] // ratio, pixels.shape[-1] // ratio)
    need = max(vae.memory_used_encode(one_image, dtype), vae.memory_used_decode(one_latent, dtype))
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=need, force_full_load=True)
    return max(1, int(comfy.model_management.get_free_memory(vae.device) // max(1, need)))


def _progress(total, callback=None):
    """ComfyUI's interrupt and one progress bar over every evaluation, then `callback`."""
    bar = comfy.utils.ProgressBar(total)

    def on_evaluation(d):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(min(d["i"] + 1, total), total)
        if callback is not None:
            callback(d)
    return on_evaluation


class DecoderInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        t = TOOLTIPS
        return schema(
            node_id="DecoderInversion",
            search_aliases=["exact vae encode", "decoder inversion", "image to latent exact", "encode without loss"],
            display_name="Decoder Inversion (VAE Encode, exact)",
            category=CATEGORY,
            description=DESCRIPTION,
            inputs=[
                io.Vae.Input("vae", tooltip=t["vae"]),
                io.Image.Input("image", tooltip=t["image"]),
                io.Combo.Input("method", options=list(METHOD_NAMES), default=METHOD, tooltip=t["method"]),
                io.Int.Input("max_iterations", default=MAX_ITERATIONS, min=1, max=2000,
                             tooltip=t["max_iterations"]),
                io.Float.Input("step_size", default=0.0, min=0.0, max=10.0, step=0.001, round=False,
                               tooltip=t["step_size"]),
                io.Float.Input("momentum", default=MOMENTUM, min=0.0, max=0.99, step=0.01, round=False,
                               tooltip=t["momentum"]),
                io.Float.Input("tolerance", default=TOLERANCE, min=0.0, max=10.0, step=0.00001, round=False,
                               tooltip=t["tolerance"]),
                io.Combo.Input("precision", options=["auto", *PRECISIONS], default="auto", tooltip=t["precision"]),
            ],
            outputs=[io.Latent.Output(tooltip="Raw latent, as VAE Encode returns it.")],
        )

    @classmethod
    def execute(cls, vae, image, method, max_iterations, step_size, momentum, tolerance, precision):
        z, log = invert_image(vae, image, method, max_iterations, step_size, momentum, tolerance, precision)
        return io.NodeOutput({"samples": z}, ui=decoder_inversion_ui(method, log))


NODES = [DecoderInversion]
