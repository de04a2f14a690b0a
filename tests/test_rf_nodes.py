"""RF-Inversion nodes in a real ComfyUI: the SAMPLERs in core SamplerCustomAdvanced graphs on the
tiny SD3-layout flow model (in-process and on the server), the one-node edit, the tiny Flux
model in-process, and the refusal of non-flow models."""
import copy

import pytest
import torch

from tests.support.metrics import nmse_db
from prompts import FLUX, SD3, SD15, Graph, random_conditioning

SD3_UNET = "tiny_sd3_flow.safetensors"


def _sd3(g):
    return g.node("UNETLoader", unet_name=SD3_UNET, weight_dtype="default").out


def _source_latent(g, model, positive, batch=1):
    """A typical latent of the tiny model (nonzero, so ComfyUI's process_latent_in applies to it)."""
    empty = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=batch).out
    return g.node("KSampler", model=model, seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                  positive=positive, negative=positive, latent_image=empty, denoise=1.0).out


def _forward(g, model, guider, latent, steps, gamma=0.0, seed=0, mode="ode"):
    sampler = g.node("RFForwardSampler", gamma=gamma, seed=seed, mode=mode).out
    sigmas = g.node("InversionSigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out
    return g.node("SamplerCustomAdvanced", noise=g.node("DisableNoise").out, guider=guider, sampler=sampler,
                  sigmas=sigmas, latent_image=latent)[0]


def _reverse(g, model, guider, noise_latent, reference, steps, eta=0.0, stop=0.25, mode="ode"):
    sampler = g.node("RFReverseSampler", reference=reference, eta=eta, start=0.0, stop=stop, trend="constant",
                     mode=mode, seed=0).out
    sigmas = g.node("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0).out
    return g.node("SamplerCustomAdvanced", noise=g.node("DisableNoise").out, guider=guider, sampler=sampler,
                  sigmas=sigmas, latent_image=noise_latent)[0]


def _round_trip_graph(tag, steps_list, eta=0.0, stop=0.25):
    """Source latent -> RF Forward (gamma 0) -> RF Reverse, once per step count, all core wiring."""
    g = Graph()
    model = _sd3(g)
    positive = random_conditioning(g, SD3, seed=1)
    guider = g.node("BasicGuider", model=model, conditioning=positive).out
    source = _source_latent(g, model, positive)
    g.node("EITestCapture", label=f"{tag}_source", latent=source)
    for steps in steps_list:
        noise = _forward(g, model, guider, source, steps)
        g.node("EITestCapture", label=f"{tag}_noise_{steps}", latent=noise)
        out = _reverse(g, model, guider, noise, source, steps, eta=eta, stop=stop)
        g.node("EITestCapture", label=f"{tag}_out_{steps}", latent=out)
    return g.prompt


def test_gamma0_eta0_round_trip_reproduces_the_input_up_to_euler_error(comfy):
    # gamma = eta = 0 is plain Euler ODE inversion and Euler regeneration: their mismatch is the
    # first-order discretisation error (measured -18.5 dB at 8 steps, -29.1 dB at 28), so the round
    # trip must be close at 28 steps and improve with steps; it is not an exact inverse.
    result = comfy.run(_round_trip_graph("rt", (8, 28)))
    assert result.ok, result.error
    source = result.capture("rt_source")["latent"]
    coarse = nmse_db(result.capture("rt_out_8")["latent"], source).item()
    fine = nmse_db(result.capture("rt_out_28")["latent"], source).item()
    assert fine < -25, f"28-step round trip NMSE {fine:.1f} dB"
    assert fine < coarse - 6, f"error must shrink with steps (8: {coarse:.1f} dB, 28: {fine:.1f} dB)"
    noise = result.capture("rt_noise_28")["latent"]
    assert torch.isfinite(noise).all(), "the forward ends at sigma = 1 and must return the raw noise"


def test_reverse_with_eta1_everywhere_returns_the_reference_on_the_server(comfy_server):
    # eta = 1 on every step replaces D by the reference, so Euler lands on it exactly (float32
    # rounding of process_latent_in/out only): this also proves the reference LATENT (user space)
    # is converted into the sampler's space, since SD3's latent format scales and shifts it.
    result = comfy_server.run(_round_trip_graph("srv", (6,), eta=1.0, stop=1.0))
    assert result.ok, result.error
    source = result.capture("srv_source")["latent"]
    out = result.capture("srv_out_6")["latent"]
    assert (out - source).abs().max() < 1e-5


def _seeded_forwards(batch_seeds, gamma=0.5, mode="ode"):
    """One forward per (batch, seed), all from the same source latent (repeated for batch 2)."""
    g = Graph()
    model = _sd3(g)
    positive = random_conditioning(g, SD3, seed=1)
    guider = g.node("BasicGuider", model=model, conditioning=positive).out
    source = _source_latent(g, model, positive)
    for batch, seed in batch_seeds:
        latent = source if batch == 1 else g.node("RepeatLatentBatch", samples=source, amount=batch).out
        noise = _forward(g, model, guider, latent, 4, gamma=gamma, seed=seed, mode=mode)
        g.node("EITestCapture", label=f"seeded_{mode}_{batch}_{seed}", latent=noise)
    return g.prompt


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_same_seed_gives_identical_noise_and_another_seed_does_not(comfy, mode):
    first = comfy.run(_seeded_forwards([(1, 5), (1, 6)], mode=mode))
    second = comfy.run(_seeded_forwards([(1, 5)], mode=mode))
    assert first.ok and second.ok, first.error or second.error
    a = first.capture(f"seeded_{mode}_1_5")["latent"]
    assert torch.equal(a, second.capture(f"seeded_{mode}_1_5")["latent"])
    assert not torch.allclose(a, first.capture(f"seeded_{mode}_1_6")["latent"])


def test_batch_of_two_gets_independent_y1_equal_to_single_runs(comfy):
    # Two copies of one image, gamma = 1: the forward lands on y1 itself, drawn per row from seed + b.
    result = comfy.run(_seeded_forwards([(2, 5), (1, 5), (1, 6)], gamma=1.0))
    assert result.ok, result.error
    batch = result.capture("seeded_ode_2_5")["latent"]
    assert not torch.allclose(batch[0], batch[1])
    # The last step is x + (y1 - x): 1e-6 allows the rounding of x, which batching changes slightly.
    assert (batch[0] - result.capture("seeded_ode_1_5")["latent"][0]).abs().max() < 1e-6
    assert (batch[1] - result.capture("seeded_ode_1_6")["latent"][0]).abs().max() < 1e-6


@pytest.mark.parametrize("sampling, kind", [(None, "eps"), ("v_prediction", "v")])
def test_non_flow_model_gets_a_clear_error(comfy, sampling, kind):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out
    if sampling:
        model = g.node("ModelSamplingDiscrete", sampling=sampling, zsnr=False, model=model).out
    positive = random_conditioning(g, SD15, seed=1)
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1).out
    edited = g.node("RFInversionEdit", model=model, source=positive, target=positive, latent=latent, steps=2,
                    scheduler="simple", cfg=1.0, gamma=0.5, eta=0.9, start=0.0, stop=0.25, seed=0).out
    g.node("EITestCapture", label="never", latent=edited)
    result = comfy.run(g.prompt)
    assert not result.ok
    assert f"RF-Inversion needs a rectified-flow model; this model predicts {kind}" in result.error, result.error


def test_forward_sampler_refuses_descending_sigmas(comfy):
    g = Graph()
    model = _sd3(g)
    positive = random_conditioning(g, SD3, seed=1)
    sampler = g.node("RFForwardSampler", gamma=0.5, seed=0, mode="ode").out
    sigmas = g.node("BasicScheduler", model=model, scheduler="simple", steps=3, denoise=1.0).out
    out = g.node("SamplerCustom", model=model, add_noise=False, noise_seed=0, cfg=1.0, positive=positive,
                 negative=positive, sampler=sampler, sigmas=sigmas, latent_image=_source_latent(g, model, positive))
    g.node("EITestCapture", label="never", latent=out[0])
    result = comfy.run(g.prompt)
    assert not result.ok and "Inversion Sigmas" in result.error, result.error


def test_edit_node_changes_the_latent_and_eta1_everywhere_keeps_it(comfy):
    g = Graph()
    model = _sd3(g)
    source_cond = random_conditioning(g, SD3, seed=1)
    target_cond = random_conditioning(g, SD3, seed=9, scale=3.0)
    source = _source_latent(g, model, source_cond)
    common = dict(model=model, source=source_cond, target=target_cond, latent=source, steps=6,
                  scheduler="simple", cfg=1.0, gamma=0.5, start=0.0, seed=0)
    g.node("EITestCapture", label="edit_source", latent=source)
    g.node("EITestCapture", label="edit_default", latent=g.node("RFInversionEdit", eta=0.9, stop=0.25, **common).out)
    g.node("EITestCapture", label="edit_keep", latent=g.node("RFInversionEdit", eta=1.0, stop=1.0, **common).out)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    source = result.capture("edit_source")["latent"]
    assert (result.capture("edit_keep")["latent"] - source).abs().max() < 1e-5
    edited = result.capture("edit_default")["latent"]
    assert torch.isfinite(edited).all() and nmse_db(edited, source).item() > -20, "the edit must change the latent"


def _flux_conditioning(seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 8, FLUX["width"], generator=g),
             {"pooled_output": torch.randn(batch, FLUX["pooled_width"], generator=g)}]]


def test_edit_runs_on_tiny_flux_in_process_and_leaves_inputs_unchanged(comfy):
    from tests.support.tiny_models import tiny_flux_model
    rf = comfy.pack_module("nodes.rf")
    model = tiny_flux_model()
    options_before = copy.deepcopy(model.model_options)
    patches_before = dict(model.patches)
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    samples = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    latent = {"samples": samples.clone()}
    with torch.inference_mode():
        out, fwd, rev = rf.rf_inversion_edit(model, _flux_conditioning(1), _flux_conditioning(2), None, latent,
                                             steps=4, scheduler="simple", cfg=1.0, gamma=0.5, eta=1.0, start=0.0,
                                             stop=1.0, seed=0)
    # eta = 1 on every step lands on the reference (float32 rounding only).
    assert (out["samples"] - samples).abs().max() < 1e-5
    assert fwd.model_calls == 4 and rev.model_calls == 4
    assert torch.equal(latent["samples"], samples) and latent.keys() == {"samples"}
    assert model.model_options == options_before and model.patches == patches_before
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.state_dict().items())
