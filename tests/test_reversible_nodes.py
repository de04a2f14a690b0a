"""The Reversible Sampler and its inverse in a real ComfyUI: generate with SamplerCustom, invert (Invert Latent
with method reversible, or the Reversible Inversion Sampler in SamplerCustom), regenerate with the second
state from the LATENT dict; EPS, V and flow models; in-process and queued on a server; bad second states are
refused by name. Tiny random-weight models at 64 px (8x8 latents), float32."""
import math

import pytest

from prompts import SD3, SD15, Graph, random_conditioning

LIMIT_DB = -100.0   # the target for float32


def nmse_db(estimate, truth):
    error = float((estimate - truth).pow(2).sum() / truth.pow(2).sum())
    return 10 * math.log10(error) if error > 0 else -math.inf


def load(g, family, v_prediction=False):
    name = "tiny_sd15_eps.safetensors" if family is SD15 else "tiny_sd3_flow.safetensors"
    model = g.node("UNETLoader", unet_name=name, weight_dtype="default").out
    if v_prediction:
        model = g.node("ModelSamplingDiscrete", sampling="v_prediction", zsnr=False, model=model).out
    return model


class Setup:
    """A model, conditioning, and a latent the Reversible Sampler generated through SamplerCustom."""

    def __init__(self, g, family, steps=6, cfg=5.0, scheduler="normal", v_prediction=False):
        self.g, self.steps, self.cfg, self.scheduler = g, steps, cfg, scheduler
        self.model = load(g, family, v_prediction)
        self.positive = random_conditioning(g, family, seed=1)
        self.negative = random_conditioning(g, family, seed=2)
        empty = g.node("EmptyLatentImage" if family is SD15 else "EmptySD3LatentImage", width=64, height=64,
                       batch_size=2).out
        self.image = self.sampler_custom(self.sampler(), empty, self.sigmas(), add_noise=True)[0]

    def sampler(self, second_state=None, variant="auto"):
        extra = {} if second_state is None else {"second_state": second_state}
        return self.g.node("ReversibleSampler", variant=variant, gamma=1.0, **extra).out

    def sigmas(self):
        return self.g.node("BasicScheduler", model=self.model, scheduler=self.scheduler, steps=self.steps,
                           denoise=1.0).out

    def sampler_custom(self, sampler, latent, sigmas, add_noise=False):
        return self.g.node("SamplerCustom", model=self.model, add_noise=add_noise, noise_seed=3, cfg=self.cfg,
                           positive=self.positive, negative=self.negative, sampler=sampler, sigmas=sigmas,
                           latent_image=latent)

    def invert_latent(self, latent=None):
        return self.g.node("InvertLatent", model=self.model, positive=self.positive, negative=self.negative,
                           latent=latent or self.image, sampler_name="euler", scheduler=self.scheduler,
                           steps=self.steps, cfg=self.cfg, method="reversible", max_iterations=100,
                           tolerance=1e-4, denoise=1.0).out

    def regenerate(self, start, second_state):
        """SamplerCustomAdvanced with Inverted Noise: the recipe for every model."""
        noise = self.g.node("InvertedNoise", model=self.model, latent=start).out
        guider = self.g.node("CFGGuider", model=self.model, positive=self.positive, negative=self.negative,
                             cfg=self.cfg).out
        return self.g.node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=self.sampler(second_state),
                           sigmas=self.sigmas(), latent_image=start)[0]


def run_and_capture(runner, g, *labels):
    result = runner.run(g.prompt)
    assert result.ok, result.error
    return [result.capture(label)["latent"] for label in labels]


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_invert_latent_round_trip_is_exact(comfy, kind):
    g = Graph()
    s = Setup(g, SD3 if kind == "flow" else SD15, v_prediction=kind == "v",
              scheduler="simple" if kind == "flow" else "karras")
    start = s.invert_latent()
    g.node("EITestCapture", label=f"rev_{kind}_image", latent=s.image)
    g.node("EITestCapture", label=f"rev_{kind}_regenerated", latent=s.regenerate(start, start))
    image, regenerated = run_and_capture(comfy, g, f"rev_{kind}_image", f"rev_{kind}_regenerated")
    assert nmse_db(regenerated, image) <= LIMIT_DB


@pytest.mark.parametrize("kind, chosen, other", [("eps", "capped", "ddim_leapfrog"), ("flow", "ddim_leapfrog", "capped")])
def test_auto_variant_is_chosen_from_the_model_sampling(comfy, kind, chosen, other):
    g = Graph()
    s = Setup(g, SD3 if kind == "flow" else SD15, scheduler="simple" if kind == "flow" else "karras")
    empty = g.node("EmptyLatentImage" if kind == "eps" else "EmptySD3LatentImage", width=64, height=64,
                   batch_size=2).out
    for variant in ("auto", chosen, other):
        sample = s.sampler_custom(s.sampler(variant=variant), empty, s.sigmas(), add_noise=True)[0]
        g.node("EITestCapture", label=f"rev_auto_{kind}_{variant}", latent=sample)
    auto, same, different = run_and_capture(comfy, g, *(f"rev_auto_{kind}_{v}" for v in ("auto", chosen, other)))
    assert (auto == same).all()
    assert nmse_db(auto, different) > LIMIT_DB + 40


def test_inversion_sampler_in_sampler_custom_hands_its_state_out_as_denoised_output(comfy):
    g = Graph()
    s = Setup(g, SD15, cfg=7.0, scheduler="karras")
    inverter = g.node("ReversibleInversionSampler", variant="auto", gamma=1.0).out
    sigmas = g.node("InversionSigmas", model=s.model, scheduler="karras", steps=s.steps, denoise=1.0).out
    inverted = s.sampler_custom(inverter, s.image, sigmas)
    regenerated = s.sampler_custom(s.sampler(second_state=inverted[1]), inverted[0], s.sigmas())[0]
    g.node("EITestCapture", label="rev_sc_image", latent=s.image)
    g.node("EITestCapture", label="rev_sc_regenerated", latent=regenerated)
    g.node("EITestCapture", label="rev_sc_without_state", latent=s.sampler_custom(s.sampler(), inverted[0],
                                                                                    s.sigmas())[0])
    image, regenerated, without_state = run_and_capture(comfy, g, "rev_sc_image", "rev_sc_regenerated",
                                                        "rev_sc_without_state")
    assert nmse_db(regenerated, image) <= LIMIT_DB
    assert nmse_db(without_state, image) > LIMIT_DB + 40   # the state is what makes it exact


def test_round_trip_queued_on_a_server(comfy_server):
    g = Graph()
    s = Setup(g, SD3, steps=4, scheduler="simple")
    start = s.invert_latent()
    g.node("EITestCapture", label="rev_server_image", latent=s.image)
    g.node("EITestCapture", label="rev_server_regenerated", latent=s.regenerate(start, start))
    image, regenerated = run_and_capture(comfy_server, g, "rev_server_image", "rev_server_regenerated")
    assert nmse_db(regenerated, image) <= LIMIT_DB


def test_a_second_state_of_another_size_is_refused_by_name(comfy):
    g = Graph()
    s = Setup(g, SD15, steps=3)
    other = g.node("EmptyLatentImage", width=32, height=32, batch_size=2).out
    g.node("EITestCapture", label="rev_bad_state", latent=s.sampler_custom(s.sampler(other), s.image, s.sigmas())[0])
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "second_state['samples']" in result.error and "shape" in result.error


def test_a_second_state_for_other_sigmas_is_refused_by_name(comfy):
    g = Graph()
    s = Setup(g, SD15, steps=4, scheduler="karras")
    start = s.invert_latent()
    other_steps = g.node("BasicScheduler", model=s.model, scheduler="karras", steps=7, denoise=1.0).out
    g.node("EITestCapture", label="rev_bad_sigma", latent=s.sampler_custom(s.sampler(start), start, other_steps)[0])
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "second_state['reversible_state']" in result.error and "sigma" in result.error
