"""The pack on a FLUX.2-layout model in a real ComfyUI (0.33 or later): the tiny FLUX.2 transformer
(tests/support/flux2.py) loaded by UNETLoader, the tiny CLIP-L by CLIPLoader, FLUX.2's real tiny autoencoder
(taef2) by VAELoader, FluxGuidance as FLUX.2 workflows condition. Its latents are the packed 128-channel ones
at 1/16 of the image (latent_formats.Flux2); every node derives channels and sigmas from the model.
Skips with the one-line reason where this ComfyUI has no FLUX.2 class or taef2 is absent."""
import math

import pytest
import torch

from prompts import Graph

STEPS_CASES = [("euler", 10), ("dpmpp_2m", 10), ("euler", 28), ("dpmpp_2m", 28)]
REPRODUCED_DB = -40.0
SIZE = 128          # px: 8x8 packed latents keep the tests cheap; the bench runs 256 px


@pytest.fixture(scope="module")
def flux2(comfy):
    from tests.support.flux2 import RANDOM_UNET, TEXT_ENCODER, flux2_missing_reason, register_flux2
    if flux2_missing_reason():
        pytest.skip(flux2_missing_reason())
    register_flux2()
    return {"unet": RANDOM_UNET, "clip": TEXT_ENCODER}


def nmse_db(estimate, truth):
    error = float((estimate - truth).pow(2).sum() / truth.pow(2).sum())
    return 10 * math.log10(error) if error > 0 else -math.inf


class Flux2Graph:
    """Loaders, FluxGuidance-conditioned prompts and a KSampler image latent on the tiny FLUX.2."""

    def __init__(self, files, sampler="euler", steps=10, size=SIZE, batch=1):
        from tests.support.flux2 import FLUX_GUIDANCE
        self.g = g = Graph()
        self.sampler, self.steps = sampler, steps
        self.model = g.node("UNETLoader", unet_name=files["unet"], weight_dtype="default").out
        clip = g.node("CLIPLoader", clip_name=files["clip"], type="stable_diffusion").out
        self.cond = {text: g.node("FluxGuidance", guidance=FLUX_GUIDANCE,
                                  conditioning=g.node("CLIPTextEncode", clip=clip, text=text).out).out
                     for text in ("cat face", "red apple", "")}
        self.positive, self.negative = self.cond["cat face"], self.cond[""]
        self.empty = g.node("EmptyFlux2LatentImage", width=size, height=size, batch_size=batch).out
        self.image = g.node("KSampler", model=self.model, seed=3, steps=steps, cfg=1.0, sampler_name=sampler,
                            scheduler="simple", positive=self.positive, negative=self.negative,
                            latent_image=self.empty, denoise=1.0).out

    def regenerate(self, noise_latent, noise=None):
        g = self.g
        noise = noise or g.node("InvertedNoise", model=self.model, latent=noise_latent).out
        guider = g.node("BasicGuider", model=self.model, conditioning=self.positive).out
        sigmas = g.node("BasicScheduler", model=self.model, scheduler="simple", steps=self.steps, denoise=1.0).out
        return g.node("SamplerCustomAdvanced", noise=noise, guider=guider,
                      sampler=g.node("KSamplerSelect", sampler_name=self.sampler).out, sigmas=sigmas,
                      latent_image=noise_latent)[0]

    def capture(self, label, latent):
        self.g.node("EITestCapture", label=label, latent=latent)


def run(comfy, graph, *labels):
    result = comfy.run(graph.g.prompt)
    assert result.ok, result.error
    return [result.capture(label)["latent"] for label in labels]


@pytest.mark.parametrize("sampler,steps", STEPS_CASES)
def test_packed_128_channel_latent_round_trips_through_invert_latent(comfy, flux2, sampler, steps):
    s = Flux2Graph(flux2, sampler, steps)
    noise = s.g.node("InvertLatent", model=s.model, positive=s.positive, negative=s.negative, latent=s.image,
                     sampler_name=sampler, scheduler="simple", steps=steps, cfg=1.0, method="exact",
                     max_iterations=100, tolerance=1e-4, denoise=1.0).out
    s.capture("image", s.image)
    s.capture("regenerated", s.regenerate(noise))
    image, regenerated = run(comfy, s, "image", "regenerated")
    assert image.shape[1] == 128, "FLUX.2's latents are the packed 128-channel ones"
    assert nmse_db(regenerated, image) <= REPRODUCED_DB, f"{sampler} {steps}: {nmse_db(regenerated, image):.1f} dB"


def test_rf_inversion_edit_runs_on_the_packed_latent(comfy, flux2):
    s = Flux2Graph(flux2, steps=6)
    common = dict(model=s.model, source=s.positive, target=s.cond["red apple"], latent=s.image, steps=6,
                  scheduler="simple", cfg=1.0, gamma=0.5, start=0.0, seed=0)
    s.capture("edit_source", s.image)
    s.capture("edit_default", s.g.node("RFInversionEdit", eta=0.9, stop=0.25, **common).out)
    s.capture("edit_keep", s.g.node("RFInversionEdit", eta=1.0, stop=1.0, **common).out)
    source, edited, kept = run(comfy, s, "edit_source", "edit_default", "edit_keep")
    assert (kept - source).abs().max() < 1e-4, "eta 1 on every step must land on the reference"
    assert torch.isfinite(edited).all() and nmse_db(edited, source) > -20, "the edit must change the latent"


def test_tree_ring_marks_and_detects_a_channel_beyond_sd3s_16(comfy, flux2):
    s, channel, radius, steps = Flux2Graph(flux2, steps=6), 100, 3, 6
    noises = {"marked": s.g.node("TreeRingNoise", seed=5, key_seed=11, channel=channel, radius=radius).out,
              "clean": s.g.node("RandomNoise", noise_seed=5).out}
    detect = {kind: s.g.node("TreeRingDetect", model=s.model, positive=s.negative, negative=s.negative,
                             sampler_name="euler", scheduler="simple", steps=steps, cfg=1.0, method="exact",
                             key_seed=11, channel=channel, radius=radius, false_positive_rate=0.01,
                             latent=s.regenerate(s.empty, noise=noise)).id
              for kind, noise in noises.items()}
    result = comfy.run(s.g.prompt)
    assert result.ok, result.error
    p = {kind: result.outputs[node]["tree_ring"][0]["p_value"] for kind, node in detect.items()}
    assert p["marked"] < 0.01 < p["clean"], p


def test_trained_file_is_detected_as_flux2_and_conditioned_as_in_training(comfy, flux2):
    import comfy.latent_formats
    import comfy.supported_models
    from tests.support.flux2 import flux2_conditioning, load_flux2
    from tests.support.tiny_models import caption_embeddings
    model, clip, _ = load_flux2(trained=True)
    assert type(model.model.model_config) is comfy.supported_models.Flux2
    assert isinstance(model.model.latent_format, comfy.latent_formats.Flux2)
    assert model.model.diffusion_model.img_in.weight.shape[1] == 128
    # what CLIPLoader + CLIPTextEncode give a user is what tools/train_models.py trained on
    trained = caption_embeddings("sd15", ("cat face",))["cond"]
    cond = flux2_conditioning(clip, "cat face")
    assert cond[0][1]["guidance"] == 4.0
    assert torch.allclose(cond[0][0].float(), trained, atol=1e-3)
