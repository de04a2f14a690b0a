"""Decoder Inversion in 16 bits on a real autoencoder (taef2, FLUX.2's latent space, trained weights).

The claim (docs/results.md#auto-dtype): through a 16-bit VAE the inverted latent reconstructs a real photo at
least as well as VAE Encode's latent through the same 16-bit decoder, and within half a dB of the fp32 inversion.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.metrics import psnr_db
from tests.support.real_weights import register_taef2, taef2_missing_reason

pytestmark = pytest.mark.skipif(taef2_missing_reason() is not None, reason=str(taef2_missing_reason()))

PHOTO = Path(__file__).parent / "data" / "photo_chelsea_64.png"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def taef2(comfy):
    import comfyui_version
    import nodes
    if comfyui_version.__version__.startswith("0.3."):
        pytest.skip(f"ComfyUI {comfyui_version.__version__} cannot build taef2 (needs 0.33)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():                          # as VAELoader runs in a graph
        vae = nodes.VAELoader().load_vae(register_taef2())[0]
    yield vae
    torch.set_num_threads(threads)


def in_dtype(vae, dtype):
    """A 16-bit clone as ComfyUI runs a VAE whose vae_dtype is 16-bit; the shared VAE is left as it came."""
    clone = copy.copy(vae)
    clone.first_stage_model = copy.deepcopy(vae.first_stage_model).to(dtype)
    clone.vae_dtype = dtype
    return clone


def photo():
    """IMAGE (1, 64, 64, 3) of 8-bit values: 64 px keeps taef2's inversion short on this CPU."""
    return torch.from_numpy(np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32)[None] / 255)


def reconstruction_db(vae, z, image):
    with torch.inference_mode():
        return psnr_db(vae.decode(z).float().clamp(0, 1), image, peak=1.0).item()


@pytest.fixture(scope="module")
def fp32_inversion_db(comfy, taef2):
    node = comfy.pack_module("nodes.decoder")
    with torch.inference_mode():
        z = node.invert_image(taef2, photo())[0]
    return reconstruction_db(taef2, z, photo())


FP16_ON_CPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 convolutions have no fast CPU kernel: "
                                 "minutes for one 64 px photo, over the suite's budget (see docs/results.md#auto-dtype)")


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=FP16_ON_CPU)])
def test_16bit_inversion_beats_vae_encode_and_stays_near_fp32(comfy, taef2, fp32_inversion_db, precision):
    node = comfy.pack_module("nodes.decoder")
    vae = in_dtype(taef2, DTYPES[precision])
    image = photo()
    with torch.inference_mode():
        z = node.invert_image(vae, image, precision=precision)[0]
        encoded = vae.encode(image)
    inverted, encoder = reconstruction_db(vae, z, image), reconstruction_db(vae, encoded, image)
    print(f"{precision}: inversion {inverted:.2f} dB, VAE Encode {encoder:.2f} dB, fp32 inversion {fp32_inversion_db:.2f} dB")
    assert inverted >= encoder, (inverted, encoder)
    assert inverted >= fp32_inversion_db - 0.5, (inverted, fp32_inversion_db)
