"""Decoder Inversion node on a real ComfyUI: the trained tiny VAE (models/tiny_taesd_trained.safetensors)
and the random-weight 16-channel taesd3, in-process, as a server workflow and through its adapter.

Images: 64 px crops of held-out photos (tests/data/README.md), never seen in the VAE's training.
"Decodable" targets x = D(E(photo)) are images the decoder can produce exactly, so the true latent
z0 = E(photo) is known and NMSE_z is measurable, as in the paper's evaluation.
"""
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompts import Graph
from tests.support.metrics import nmse_db as nmse_db_per_sample
from tests.support.metrics import psnr_db as psnr_db_per_sample

DATA = Path(__file__).parent / "data"
PHOTOS = ["photo_chelsea_64.png", "photo_coffee_64.png", "photo_china_64.png"]
TRAINED = "tiny_taesd_trained.safetensors"
REPO = Path(__file__).resolve().parents[1]


def load_photos(size=32):
    """IMAGE (3, size, size, 3) of 8-bit values; 32 px keeps the adapter tests cheap (latent 4 x 4)."""
    images = [Image.open(DATA / name).convert("RGB").resize((size, size), Image.LANCZOS) for name in PHOTOS]
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]))


def quantise(image):
    return (image.clamp(0, 1) * 255).round() / 255


def nmse_db(z, z0):
    return nmse_db_per_sample(z, z0).mean().item()


def psnr_db(a, b):
    return psnr_db_per_sample(a, b).mean().item()


def last(log, key):
    """Per-sample values of `key` after the last evaluation (StepLog)."""
    return log.records[-1][key]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On this shared 2-core machine two OpenMP threads spin against other jobs (measured: TAESD
    10x slower than with one); the in-process runs here use one and give the setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decoder_node(comfy):
    return comfy.pack_module("nodes.decoder")


@pytest.fixture(scope="module")
def trained_vae(comfy):
    """The trained tiny VAE as VAELoader builds it: inside inference mode (so its weights are
    inference tensors, as in a real graph)."""
    from comfy.sd import VAE
    from comfy.utils import load_torch_file
    with torch.inference_mode():
        return VAE(sd=load_torch_file(str(REPO / "models" / TRAINED)))


@pytest.fixture(scope="module")
def decodable(trained_vae):
    """(z0, x): the photos' latents and the 8-bit images the decoder makes of them."""
    with torch.inference_mode():
        z0 = trained_vae.encode(load_photos())
        return z0, quantise(trained_vae.decode(z0))


def invert(decoder_node, vae, image, method, **kw):
    with torch.inference_mode():                          # as ComfyUI runs every node
        return decoder_node.invert_image(vae, image, method, **kw)


@pytest.mark.parametrize("method", ["forward_step", "momentum", "adam_residual"])
def test_gradient_free_methods_beat_the_encoder_in_nmse(decoder_node, trained_vae, decodable, method):
    z0, x = decodable
    z_encoder, _ = invert(decoder_node, trained_vae, x, "encoder")
    # Adam's lr is in latent units and its schedule warms up: on latents of SD's scale (the trained VAE's,
    # RMS ~5) it needs more iterations than the fixed-point methods.
    iterations = 40 if method == "adam_residual" else 10
    z, log = invert(decoder_node, trained_vae, x, method, max_iterations=iterations)
    # 8-bit quantisation of x limits how close any method can get; 3 dB is far above run-to-run noise.
    assert nmse_db(z, z0) < nmse_db(z_encoder, z0) - 3.0, (nmse_db(z, z0), nmse_db(z_encoder, z0))
    assert z.shape == z0.shape and z.dtype == torch.float32
    steps = last(log, "iterations")
    assert all(1 <= n <= iterations for n in steps) and len(log.residuals) == max(steps) + 1


def test_encoder_method_is_vae_encode_with_its_crop_and_scale(decoder_node, trained_vae):
    # 38 x 35 px is not a multiple of 8: both must centre-crop to 32 x 32 the same way.
    image = torch.rand(2, 35, 38, 3, generator=torch.Generator().manual_seed(0))
    z, _ = invert(decoder_node, trained_vae, image, "encoder")
    with torch.inference_mode():
        expected = trained_vae.encode(image)
    assert z.shape == expected.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)


def test_batch_of_three_equals_three_single_runs(decoder_node, trained_vae, decodable):
    _, x = decodable
    z_batch, log = invert(decoder_node, trained_vae, x, "forward_step", max_iterations=20, tolerance=1e-4)
    assert len(set(last(log, "iterations"))) > 1, "the samples should stop at different iterations"
    for b in range(3):
        z_one, log_one = invert(decoder_node, trained_vae, x[b:b + 1], "forward_step", max_iterations=20,
                                tolerance=1e-4)
        assert last(log_one, "iterations")[0] == last(log, "iterations")[b], "same per-sample stop"
        # batched and single convolutions may round differently (float32 ~1e-7); the iteration contracts.
        torch.testing.assert_close(z_one[0], z_batch[b], rtol=0, atol=5e-5)   # latents of RMS ~4


def test_node_defaults_are_the_inversion_ops_constants(comfy, decoder_node):
    ops = comfy.pack_module("inversion_ops.decoder")
    inputs = {i.id: i for i in decoder_node.DecoderInversion.define_schema().inputs}
    assert inputs["max_iterations"].default == ops.MAX_ITERATIONS
    assert inputs["tolerance"].default == ops.TOLERANCE
    assert inputs["momentum"].default == ops.MOMENTUM
    assert inputs["method"].default == ops.METHOD and inputs["method"].options == list(ops.METHOD_NAMES)


def test_vae_is_unchanged_after_every_method(decoder_node, trained_vae, decodable):
    _, x = decodable
    model = trained_vae.first_stage_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    device, dtype = trained_vae.device, trained_vae.vae_dtype
    for method, precision in [("gradient", "auto"), ("hybrid", "auto"), ("forward_step", "fp16"), ("momentum", "bf16"),
                              ("adam_residual", "auto"), ("encoder", "auto")]:
        invert(decoder_node, trained_vae, x[:1], method, max_iterations=2, precision=precision)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert trained_vae.device == device and trained_vae.vae_dtype == dtype
    assert all(p.device == before[k].device for k, p in model.state_dict().items())


def test_nan_image_is_refused_naming_the_input(decoder_node, trained_vae):
    image = torch.full((1, 64, 64, 3), 0.5)
    image[0, 3, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN"):
        invert(decoder_node, trained_vae, image, "forward_step")


def test_image_smaller_than_the_downscale_is_refused(decoder_node, trained_vae):
    with pytest.raises(ValueError, match="image is 6x6 px, smaller than this VAE's downscale factor 8"):
        invert(decoder_node, trained_vae, torch.rand(1, 6, 6, 3), "forward_step")


def _roundtrip_prompt(vae_name, image_name, method="forward_step", label="rt"):
    """target = VAE Decode(VAE Encode(photo)) (an image the decoder can make); then both the node and
    VAE Encode encode the target, and VAE Decode turns each latent back into an image."""
    g = Graph()
    vae = g.node("VAELoader", vae_name=vae_name).out
    photo = g.node("ImageScale", image=g.node("LoadImage", image=image_name).out, upscale_method="area",
                   width=32, height=32, crop="disabled").out      # 32 px keeps the server run cheap
    target = g.node("VAEDecode", samples=g.node("VAEEncode", pixels=photo, vae=vae).out, vae=vae).out
    inverted = g.node("DecoderInversion", vae=vae, image=target, method=method, max_iterations=20, step_size=0.0,
                      momentum=0.3, tolerance=1e-4, precision="auto")
    by_encoder = g.node("VAEEncode", pixels=target, vae=vae).out
    g.node("EITestCapture", label=f"{label}_node", latent=inverted.out,
           image=g.node("VAEDecode", samples=inverted.out, vae=vae).out)
    g.node("EITestCapture", label=f"{label}_encoder", latent=by_encoder,
           image=g.node("VAEDecode", samples=by_encoder, vae=vae).out)
    g.node("EITestCapture", label=f"{label}_target", image=target)
    return g.prompt, inverted.id


@pytest.mark.parametrize("runtime", ["comfy", "comfy_server"])
def test_node_latent_decodes_back_to_the_image_better_than_vae_encode(request, runtime):
    runner = request.getfixturevalue(runtime)
    shutil.copy(DATA / PHOTOS[0], runner.base / "input" / PHOTOS[0])
    prompt, node_id = _roundtrip_prompt(TRAINED, PHOTOS[0], label=f"rt_{runtime}")
    result = runner.run(prompt)
    assert result.ok, result.error
    target = result.capture(f"rt_{runtime}_target")["image"]
    node = result.capture(f"rt_{runtime}_node")
    encoder = result.capture(f"rt_{runtime}_encoder")
    assert node["latent"].shape == encoder["latent"].shape == (1, 4, 4, 4)
    assert psnr_db(node["image"], target) >= psnr_db(encoder["image"], target)
    ui = result.outputs[node_id]
    assert ui["inversion_convergence"][0]["series"], "residual curve for the node"
    assert ui["final_residual"][0] <= 1e-4 and 1 <= ui["iterations"][0] <= 20


def test_sixteen_channel_taesd3_works(comfy):
    g = Graph()
    vae = g.node("VAELoader", vae_name="taesd3").out
    image = g.node("EmptyImage", width=32, height=32, batch_size=2, color=0x336699).out
    inverted = g.node("DecoderInversion", vae=vae, image=image, method="momentum", max_iterations=3,
                      step_size=0.0, momentum=0.3, tolerance=0.0, precision="auto").out
    g.node("EITestCapture", label="taesd3_node", latent=inverted, image=g.node("VAEDecode", samples=inverted, vae=vae).out)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    captured = result.capture("taesd3_node")
    assert captured["latent"].shape == (2, 16, 4, 4) and torch.isfinite(captured["latent"]).all()
    assert captured["image"].shape == (2, 32, 32, 3)


def test_momentum_outside_theorem_2_is_refused_naming_the_inputs(comfy):
    g = Graph()
    vae = g.node("VAELoader", vae_name=TRAINED).out
    image = g.node("EmptyImage", width=32, height=32, batch_size=1, color=0).out
    g.node("EITestCapture", label="never", latent=g.node(
        "DecoderInversion", vae=vae, image=image, method="momentum", max_iterations=3, step_size=1.5, momentum=0.5,
        tolerance=1e-4, precision="auto").out)
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "momentum / step_size" in result.error and "Theorem 2" in result.error, result.error


def test_interrupt_stops_the_node_inside_its_loop(decoder_node, trained_vae):
    """A progress hook stands in for the user's Cancel: it sets ComfyUI's interrupt flag at the first
    progress update (newer ComfyUI throttles later ones, never the first) of a 2000-iteration run; the
    next evaluation must be the last. Evaluations are counted by a forward hook on the real decoder."""
    from comfy import model_management, utils
    decodes, seen = [], []
    decoder_hook = trained_vae.first_stage_model.taesd_decoder.register_forward_hook(
        lambda module, args, out: decodes.append(1))

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append(value)
        model_management.interrupt_current_processing(True)

    previous = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(hook)
    image = torch.full((1, 32, 32, 3), 0.5)
    try:
        with pytest.raises(model_management.InterruptProcessingException), torch.inference_mode():
            decoder_node.DecoderInversion.execute(vae=trained_vae, image=image, method="forward_step",
                                                  max_iterations=2000, step_size=0.0, momentum=0.3,
                                                  tolerance=0.0, precision="auto")
    finally:
        utils.set_progress_bar_global_hook(previous)
        model_management.interrupt_current_processing(False)
        decoder_hook.remove()
    assert seen == [1], f"no progress after the flag: {seen[:5]}"
    # evaluation 0, then at most the one that stops at its end (newer ComfyUI raises in the update itself)
    assert 1 <= len(decodes) <= 2, f"{len(decodes)} decodes after an interrupt at the first evaluation"


def test_auto_precision_is_float32_whatever_the_vae_dtype(decoder_node, trained_vae):
    # fp32 is the exact reference the 16-bit runs are held to; see docs/results.md#auto-dtype
    for vae_dtype in (torch.float16, torch.bfloat16, torch.float32):
        vae = copy.copy(trained_vae)
        vae.vae_dtype = vae_dtype
        assert decoder_node.resolve_precision(vae, "forward_step", "auto") == torch.float32


def test_batch_split_into_single_image_runs_equals_one_run(decoder_node, trained_vae, decodable):
    # what a GPU short of memory does (images per run chosen by free memory, as VAE Encode does):
    # the per-image iterations are independent, so only batched-convolution rounding may differ
    _, x = decodable
    z_one_run, log = invert(decoder_node, trained_vae, x, "forward_step", max_iterations=5, images_per_run=len(x))
    z_split, log_split = invert(decoder_node, trained_vae, x, "forward_step", max_iterations=5, images_per_run=1)
    torch.testing.assert_close(z_split, z_one_run, rtol=0, atol=5e-5)   # latents of RMS ~4
    assert last(log_split, "iterations") == last(log, "iterations") and log_split.model_calls == 3 * log.model_calls


def test_tiled_inversion_beats_the_encoder(decoder_node, trained_vae):
    # the out-of-memory fallback: overlapping tiles inverted on their own, blended as VAE Encode blends its
    # tiles. Seams cost accuracy against the whole image; the tiles must still beat the plain encoder.
    with torch.inference_mode():
        z0 = trained_vae.encode(load_photos(size=128)[:1])
        x = quantise(trained_vae.decode(z0))
    whole, _ = invert(decoder_node, trained_vae, x, "forward_step", max_iterations=10)
    tiled, log = invert(decoder_node, trained_vae, x, "forward_step", max_iterations=10, tile=64)
    encoder, _ = invert(decoder_node, trained_vae, x, "encoder")
    assert len(last(log, "iterations")) == 9   # 3 x 3 tiles of 64 px, 16 px overlap, over 128 px
    print("NMSE to z0: whole", nmse_db(whole, z0), "tiled", nmse_db(tiled, z0), "encoder", nmse_db(encoder, z0))
    assert nmse_db(tiled, z0) < nmse_db(encoder, z0) - 5   # measured: tiles -34.4, encoder -26.3 dB


def test_auto_step_runs_every_momentum_in_the_widget_range(decoder_node, trained_vae, decodable):
    from inversion_ops.decoder import check_inertial_km
    widget = {i.id: i for i in decoder_node.DecoderInversion.define_schema().inputs}["momentum"]
    steps = round((widget.max - widget.min) / widget.step)
    for k in range(steps + 1):
        alpha = widget.min + k * widget.step
        options = decoder_node.method_options("momentum", 3, 0.0, alpha, 1e-4)
        check_inertial_km(alpha, options["rho"])           # the theorem's condition holds for the auto step
    _, x = decodable
    z, log = invert(decoder_node, trained_vae, x[:1], "momentum", max_iterations=2, momentum=widget.max)
    assert torch.isfinite(z).all() and last(log, "iterations") == [2]


def test_user_step_outside_theorem_2_is_still_refused(decoder_node):
    with pytest.raises(ValueError, match="momentum / step_size.*Theorem 2"):
        decoder_node.method_options("momentum", 3, 0.5, 0.9, 1e-4)


def test_default_hybrid_reconstructs_real_photos_better_than_vae_encode(decoder_node, trained_vae):
    photos = load_photos()
    z_encoder, _ = invert(decoder_node, trained_vae, photos, "encoder")
    z, log = invert(decoder_node, trained_vae, photos, "hybrid", max_iterations=10)
    with torch.inference_mode():
        gain = psnr_db(trained_vae.decode(z), photos) - psnr_db(trained_vae.decode(z_encoder), photos)
    assert gain > 0.1, gain     # beats VAE Encode; lr is tuned for taef2's latent scale, not this VAE's
    assert len(log.records) == 10 + 2                   # 5 fixed-point evaluations, then the finish's 6
