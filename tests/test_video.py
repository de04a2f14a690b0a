"""Video latents (B, C, T, H, W) through the pack's samplers, on a tiny Wan 2.1 T2V model built through
ComfyUI's own classes and loaded by UNETLoader (tests/support/tiny_models.py), in-process and on the
server: exact inversion regenerates the video latent, and RF-Inversion's forward / reverse flows round
trip it. 64 px, 9 frames: latents (1, 16, 3, 8, 8)."""
import math

import pytest

from prompts import WAN21, Graph, random_conditioning

REPRODUCED_DB = -40.0
STEPS = 4


def nmse_db(estimate, truth):
    error = float((estimate - truth).pow(2).sum() / truth.pow(2).sum())
    return 10 * math.log10(error) if error > 0 else -math.inf


def _video_setup(g, cfg):
    """The tiny Wan model, its conditioning, and a video latent it generated with core KSampler."""
    model = g.node("UNETLoader", unet_name="tiny_wan21_flow.safetensors", weight_dtype="default").out
    positive, negative = random_conditioning(g, WAN21, seed=1), random_conditioning(g, WAN21, seed=2)
    empty = g.node("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1).out
    video = g.node("KSampler", model=model, seed=5, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="simple",
                   positive=positive, negative=negative, latent_image=empty, denoise=1.0).out
    g.node("EITestCapture", label="video", latent=video)
    return model, positive, negative, video


def exact_round_trip(cfg=3.0):
    g = Graph()
    model, positive, negative, video = _video_setup(g, cfg)
    noise = g.node("InvertLatent", model=model, positive=positive, negative=negative, latent=video,
                   sampler_name="euler", scheduler="simple", steps=STEPS, cfg=cfg, method="exact",
                   max_iterations=100, tolerance=1e-4, denoise=1.0).out
    guider = g.node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg).out
    sigmas = g.node("BasicScheduler", model=model, scheduler="simple", steps=STEPS, denoise=1.0).out
    regenerated = g.node("SamplerCustomAdvanced", noise=g.node("InvertedNoise", model=model, latent=noise).out,
                         guider=guider, sampler=g.node("KSamplerSelect", sampler_name="euler").out,
                         sigmas=sigmas, latent_image=noise)[0]
    g.node("EITestCapture", label="regenerated", latent=regenerated)
    return g.prompt


def rf_round_trip(gamma, eta, stop):
    """RF Forward (gamma) then RF Reverse toward the source (eta on [0, stop)), cfg 1 as RF-Inversion runs."""
    g = Graph()
    model, positive, _, video = _video_setup(g, 1.0)
    guider = g.node("BasicGuider", model=model, conditioning=positive).out
    up = g.node("InversionSigmas", model=model, scheduler="simple", steps=STEPS, denoise=1.0).out
    down = g.node("BasicScheduler", model=model, scheduler="simple", steps=STEPS, denoise=1.0).out
    off = g.node("DisableNoise").out
    noise = g.node("SamplerCustomAdvanced", noise=off, guider=guider, sigmas=up, latent_image=video,
                   sampler=g.node("RFForwardSampler", gamma=gamma, seed=0, mode="ode").out)[0]
    reverse = g.node("RFReverseSampler", reference=video, eta=eta, start=0.0, stop=stop, trend="constant",
                     mode="ode", seed=0).out
    out = g.node("SamplerCustomAdvanced", noise=off, guider=guider, sigmas=down, latent_image=noise,
                 sampler=reverse)[0]
    g.node("EITestCapture", label="noise", latent=noise)
    g.node("EITestCapture", label="edited", latent=out)
    return g.prompt


@pytest.mark.parametrize("runtime", ["comfy", "comfy_server"])
def test_exact_inversion_regenerates_a_video_latent(request, runtime):
    result = request.getfixturevalue(runtime).run(exact_round_trip())
    assert result.ok, result.error
    video, regenerated = result.capture("video")["latent"], result.capture("regenerated")["latent"]
    assert video.ndim == 5 and video.shape[2] == 3, tuple(video.shape)
    print(f"video exact round trip: {nmse_db(regenerated, video):.1f} dB")
    assert nmse_db(regenerated, video) < REPRODUCED_DB, nmse_db(regenerated, video)


@pytest.mark.parametrize("runtime", ["comfy", "comfy_server"])
def test_rf_forward_then_reverse_with_full_control_returns_the_video(request, runtime):
    # eta = 1 on every reverse step replaces D by the source: Euler lands on it (float32 rounding of the
    # latent format's scale and shift only), whatever gamma made the noise
    result = request.getfixturevalue(runtime).run(rf_round_trip(gamma=0.5, eta=1.0, stop=1.0))
    assert result.ok, result.error
    video, edited = result.capture("video")["latent"], result.capture("edited")["latent"]
    assert result.capture("noise")["latent"].shape == video.shape
    assert (edited - video).abs().max() < 1e-4


def test_a_video_latent_for_an_image_model_is_refused_naming_the_latent(comfy):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd3_flow.safetensors", weight_dtype="default").out
    positive = random_conditioning(g, {"width": 4096, "pooled_width": 2048}, seed=1)
    video = g.node("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1).out
    noise = g.node("InvertLatent", model=model, positive=positive, negative=positive, latent=video,
                   sampler_name="euler", scheduler="simple", steps=2, cfg=1.0, method="exact", max_iterations=10,
                   tolerance=1e-4, denoise=1.0).out
    g.node("EITestCapture", label="never", latent=noise)
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "latent has shape (1, 16, 3, 8, 8)" in result.error and "(B, 16, H, W)" in result.error, result.error


def decoder_inversion_graph():
    """Nine frames of a photo through a tiny Wan 2.1 video VAE: VAE Encode, and Decoder Inversion's
    encoder and forward_step methods."""
    g = Graph()
    vae = g.node("VAELoader", vae_name="tiny_wan21_vae.safetensors").out
    frame = g.node("LoadImage", image="exact_inversion_cat_face.png")[0]
    frame = g.node("ImageScale", image=frame, upscale_method="bilinear", width=64, height=64, crop="center").out
    frames = g.node("RepeatImageBatch", image=frame, amount=9).out
    g.node("EITestCapture", label="vae_encode", latent=g.node("VAEEncode", pixels=frames, vae=vae).out)
    ids = {}
    for method in ("encoder", "forward_step"):
        node = g.node("DecoderInversion", vae=vae, image=frames, method=method, max_iterations=5, step_size=0.0,
                      momentum=0.3, tolerance=0.0, precision="auto")
        ids[method] = node.id
        g.node("EITestCapture", label=method, latent=node.out)
    return g.prompt, ids


@pytest.mark.parametrize("runtime", ["comfy", "comfy_server"])
def test_decoder_inversion_takes_a_video_vae(request, runtime):
    runner = request.getfixturevalue(runtime)
    from tools.demo import install_input_image
    install_input_image(runner.base, 64)
    prompt, ids = decoder_inversion_graph()
    result = runner.run(prompt)
    assert result.ok, result.error
    reference = result.capture("vae_encode")["latent"]
    assert reference.shape == (1, 16, 3, 8, 8), tuple(reference.shape)   # 9 frames -> 3 latent frames
    # the encoder method is VAE Encode on the same crop and scale; forward_step keeps its lowest-residual
    # iterate, which starts at the encoder's latent, so its residual can only be lower
    assert (result.capture("encoder")["latent"] - reference).abs().max() < 1e-5
    assert result.capture("forward_step")["latent"].shape == reference.shape
    residual = {m: result.outputs[ids[m]]["final_residual"][0] for m in ids}
    assert residual["forward_step"] < residual["encoder"], residual
