"""Decoder Inversion on a real trained autoencoder: FLUX.2's tiny autoencoder taef2 (../shared/weights/taef2,
trained by its authors on photographs), loaded by ComfyUI's own VAELoader, on the real photos in tests/data.

Only ComfyUI 0.33 and later build taef2 (`make test COMFYUI=0.33.0`); elsewhere, or without the weights, every
test here skips with a one-line reason. Iteration counts are kept small so the file stays cheap on a CPU:
these tests check format, batch and tiling behaviour and that the inversion does not lose to VAE Encode, not
how far it converges (that is `make bench SUITE=decoder_real`).
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompts import Graph
from tests.support.metrics import psnr_db
from tests.support.real_weights import register_taef2, taef2_dir, taef2_missing_reason
from tests.test_decoder_node import one_thread  # noqa: F401  autouse: one torch thread on this shared machine

DATA = Path(__file__).parent / "data"
PHOTOS = ["photo_chelsea_256.jpg", "photo_coffee_256.jpg", "photo_china_256.jpg"]
FLUX2_CHANNELS, FLUX2_RATIO = 128, 16   # FLUX.2's 32 channels at 8x, packed 2x2 (latent_formats.Flux2)
METHOD, ITERATIONS = "forward_step", 3   # named, not the widget default, so a new default cannot slow this file

pytestmark = pytest.mark.skipif(taef2_missing_reason() is not None, reason=str(taef2_missing_reason()))


def load_photo(name, width, height):
    """IMAGE (1, height, width, 3): the photo scaled to cover width x height, centre-cropped."""
    image = Image.open(DATA / name).convert("RGB")
    scale = max(width / image.width, height / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]


@pytest.fixture(scope="module")
def taef2(comfy):
    """taef2 as a user gets it: VAELoader("taef2") once the weights' folder is a vae_approx path."""
    import comfyui_version
    import nodes
    if "taef2" not in getattr(nodes.VAELoader, "image_taes", ()):
        pytest.skip(f"ComfyUI {comfyui_version.__version__} cannot build taef2 (its TAESD lacks FLUX.2's "
                    "GroupNorm pooling): run `make test COMFYUI=0.33.0`")
    with torch.inference_mode():
        return nodes.VAELoader().load_vae(register_taef2())[0]


@pytest.fixture(scope="module")
def decoder_node(comfy):
    return comfy.pack_module("nodes.decoder")


def encode(vae, image):
    import nodes
    with torch.inference_mode():
        return nodes.VAEEncode().encode(vae, image)[0]["samples"]


def reconstruction_psnr(vae, latent, image):
    """PSNR per image of VAE Decode(latent) against the image, as a user would see it."""
    import nodes
    with torch.inference_mode():
        decoded = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
    return psnr_db(decoded.clamp(0, 1), image)


def invert(decoder_node, vae, image, **kwargs):
    with torch.inference_mode():
        return decoder_node.invert_image(vae, image, METHOD, ITERATIONS, **kwargs)[0]


@pytest.fixture(scope="module")
def photo_batch():
    return torch.cat([load_photo(name, 128, 128) for name in PHOTOS])


@pytest.fixture(scope="module")
def batch_latent(decoder_node, taef2, photo_batch):
    return invert(decoder_node, taef2, photo_batch)


def test_batch_is_the_packed_flux2_latent_and_reconstructs_at_least_as_well_as_vae_encode(
        taef2, photo_batch, batch_latent):
    import comfy.latent_formats
    assert comfy.latent_formats.Flux2().latent_channels == FLUX2_CHANNELS == taef2.latent_channels
    z_encoder = encode(taef2, photo_batch)
    assert batch_latent.shape == z_encoder.shape == (3, FLUX2_CHANNELS, 128 // FLUX2_RATIO, 128 // FLUX2_RATIO)
    assert batch_latent.dtype == torch.float32 and torch.isfinite(batch_latent).all()
    ours, theirs = reconstruction_psnr(taef2, batch_latent, photo_batch), reconstruction_psnr(taef2, z_encoder, photo_batch)
    # every photo, not the mean: the iteration starts at the encoder's latent and must not end worse
    assert (ours >= theirs).all(), f"Decoder Inversion {ours.tolist()} dB vs VAE Encode {theirs.tolist()} dB"


def test_each_image_is_inverted_independently_of_the_rest_of_its_batch(decoder_node, taef2, photo_batch,
                                                                         batch_latent):
    # the same photos in another batch (order reversed, one left out) give the same latents
    z_other = invert(decoder_node, taef2, photo_batch[[2, 0]])
    torch.testing.assert_close(z_other, batch_latent[[2, 0]], rtol=0, atol=1e-4)


def test_non_square_image(decoder_node, taef2):
    image = load_photo(PHOTOS[1], 192, 128)   # wider than tall: width and height must not be swapped
    z = invert(decoder_node, taef2, image)
    z_encoder = encode(taef2, image)
    assert z.shape == z_encoder.shape == (1, FLUX2_CHANNELS, 128 // FLUX2_RATIO, 192 // FLUX2_RATIO)
    assert (reconstruction_psnr(taef2, z, image) >= reconstruction_psnr(taef2, z_encoder, image)).all()


def test_tiled_inversion_of_a_large_image(decoder_node, taef2):
    # the out-of-memory fallback, forced: two overlapping tiles of the node's tile size over a 640 x 512 photo;
    # one iteration, as tiles of this size are the costliest runs here
    image = load_photo(PHOTOS[0], 640, 512)
    with torch.inference_mode():
        z_tiled = decoder_node.invert_image(taef2, image, METHOD, 1, tile=decoder_node.TILE)[0]
    z_encoder = encode(taef2, image)
    assert z_tiled.shape == z_encoder.shape == (1, FLUX2_CHANNELS, 512 // FLUX2_RATIO, 640 // FLUX2_RATIO)
    ours, theirs = reconstruction_psnr(taef2, z_tiled, image), reconstruction_psnr(taef2, z_encoder, image)
    # seams cost accuracy against the whole image: the tiles must still not lose to the plain encoder
    assert (ours >= theirs).all(), f"tiled Decoder Inversion {ours.tolist()} dB vs VAE Encode {theirs.tolist()} dB"


def test_queued_workflow_on_the_server(comfy_server, decoder_node, taef2):
    """The saved-workflow path: VAELoader("taef2") -> Decoder Inversion -> VAE Decode, queued over HTTP."""
    if "taef2" not in comfy_server.object_info()["VAELoader"]["input"]["required"]["vae_name"][0]:
        pytest.fail(f"the server does not list taef2: is {taef2_dir()} in its extra model paths?")
    image = load_photo(PHOTOS[2], 128, 128)
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(comfy_server.base / "input" / "taef2.png")
    g = Graph()
    vae = g.node("VAELoader", vae_name="taef2")
    latent = g.node("DecoderInversion", vae=vae[0], image=g.node("LoadImage", image="taef2.png")[0], method=METHOD,
                    max_iterations=ITERATIONS, step_size=0.0, momentum=decoder_node.MOMENTUM,
                    tolerance=decoder_node.TOLERANCE, precision="auto")
    g.node("EITestCapture", label="taef2_latent", latent=latent[0])
    g.node("EITestCapture", label="taef2_decoded", image=g.node("VAEDecode", vae=vae[0], samples=latent[0])[0])
    result = comfy_server.run(g.prompt)
    assert result.ok, result.error
    assert result.capture("taef2_latent")["latent"].shape == (1, FLUX2_CHANNELS, 128 // FLUX2_RATIO, 128 // FLUX2_RATIO)
    ours = psnr_db(result.capture("taef2_decoded")["image"].clamp(0, 1), image)
    assert (ours >= reconstruction_psnr(taef2, encode(taef2, image), image)).all()
