"""Masked (regional) edits and FlowEdit in a real ComfyUI, on the tiny SD3-layout flow model (and the tiny
Wan 2.1 video model): outside the noise_mask the edited latent is the source; a mask that does not fit is
refused; FlowEdit runs as the one-node edit and through SamplerCustomAdvanced, and refuses EPS models."""
import pytest
import torch

from prompts import FLUX, SD3, SD15, WAN21, Graph, random_conditioning
from tests.support.metrics import nmse_db

SD3_UNET = "tiny_sd3_flow.safetensors"
OUTSIDE_DB = -60.0   # the bar for "the output is the source outside the mask"


def _setup(g, batch=1):
    model = g.node("UNETLoader", unet_name=SD3_UNET, weight_dtype="default").out
    source_cond = random_conditioning(g, SD3, seed=1)
    target_cond = random_conditioning(g, SD3, seed=9, scale=3.0)
    empty = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=batch).out
    source = g.node("KSampler", model=model, seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                    positive=source_cond, negative=source_cond, latent_image=empty, denoise=1.0).out
    g.node("EITestCapture", label="source", latent=source)
    return model, source_cond, target_cond, source


def _left_half_mask(g):
    """A 64 px MASK, 1 on the left 32 columns: the latent's left 4 of 8 columns, exactly 0 on the right 4."""
    solid = g.node("SolidMask", value=0.0, width=64, height=64).out
    ones = g.node("SolidMask", value=1.0, width=32, height=64).out
    return g.node("MaskComposite", destination=solid, source=ones, x=0, y=0, operation="add").out


def _outside_inside(result, label):
    source, edited = result.capture("source")["latent"], result.capture(label)["latent"]
    outside = nmse_db(edited[..., 4:], source[..., 4:]).max().item()
    inside = nmse_db(edited[..., :4], source[..., :4]).min().item()
    return outside, inside


def _masked_edits_graph():
    """The same masked source through every edit path: RF-Inversion Edit, the RF samplers in
    SamplerCustomAdvanced, Invert Latent + regeneration, FlowEdit (one node and sampler + guider)."""
    g = Graph()
    model, src, tgt, source = _setup(g, batch=2)
    masked = g.node("SetLatentNoiseMask", samples=source, mask=_left_half_mask(g)).out
    g.node("EITestCapture", label="rf_node", latent=g.node(
        "RFInversionEdit", model=model, source=src, target=tgt, latent=masked, steps=4, scheduler="simple", cfg=1.0,
        gamma=0.5, eta=0.9, start=0.0, stop=0.25, seed=0).out)
    guider = g.node("BasicGuider", model=model, conditioning=tgt).out
    up = g.node("InversionSigmas", model=model, scheduler="simple", steps=4, denoise=1.0).out
    down = g.node("BasicScheduler", model=model, scheduler="simple", steps=4, denoise=1.0).out
    noise = g.node("SamplerCustomAdvanced", noise=g.node("DisableNoise").out,
                   guider=g.node("BasicGuider", model=model, conditioning=src).out,
                   sampler=g.node("RFForwardSampler", gamma=0.5, seed=0, mode="ode").out, sigmas=up,
                   latent_image=masked)[0]
    reverse = g.node("RFReverseSampler", reference=source, eta=0.9, start=0.0, stop=0.25, trend="constant",
                     mode="ode", seed=0).out
    g.node("EITestCapture", label="rf_samplers", latent=g.node(
        "SamplerCustomAdvanced", noise=g.node("DisableNoise").out, guider=guider, sampler=reverse, sigmas=down,
        latent_image=noise)[0])
    inverted = g.node("InvertLatent", model=model, positive=src, negative=src, latent=source, sampler_name="euler",
                      scheduler="simple", steps=4, cfg=1.0, method="exact", max_iterations=50, tolerance=1e-4,
                      denoise=1.0).out
    g.node("EITestCapture", label="exact_regen", latent=g.node(
        "SamplerCustomAdvanced", noise=g.node("InvertedNoise", model=model, latent=inverted).out, guider=guider,
        sampler=g.node("KSamplerSelect", sampler_name="euler").out, sigmas=down, latent_image=masked)[0])
    prompts = dict(source=src, target=tgt, negative=src, source_cfg=1.0, target_cfg=3.0)
    counts = dict(n_max=3, n_min=0, n_avg=1, seed=0)
    g.node("EITestCapture", label="flowedit_node", latent=g.node(
        "FlowEdit", model=model, latent=masked, steps=4, scheduler="simple", **prompts, **counts).out)
    g.node("EITestCapture", label="flowedit_samplers", latent=g.node(
        "SamplerCustomAdvanced", noise=g.node("DisableNoise").out,
        guider=g.node("FlowEditGuider", model=model, **prompts).out,
        sampler=g.node("FlowEditSampler", **counts).out, sigmas=down, latent_image=masked)[0])
    return g.prompt


@pytest.fixture(scope="module")
def masked_result(comfy):
    result = comfy.run(_masked_edits_graph())
    assert result.ok, result.error
    return result


@pytest.mark.parametrize("path", ["rf_node", "rf_samplers", "exact_regen", "flowedit_node", "flowedit_samplers"])
def test_masked_edit_keeps_the_source_outside_the_mask_and_edits_inside(masked_result, path):
    outside, inside = _outside_inside(masked_result, path)
    assert outside <= OUTSIDE_DB, f"{path}: outside the mask {outside:.1f} dB from the source"
    assert inside > -20, f"{path}: inside the mask {inside:.1f} dB: the edit must change it"


@pytest.mark.parametrize("mask_shape, words", [((3, 64, 64), "holds 3 masks but the latent batch has 2"),
                                                ((1, 64, 32), "aspect ratio")])
def test_a_mask_that_does_not_fit_the_latent_is_refused_naming_it(comfy, mask_shape, words):
    rf, flowedit = comfy.pack_module("nodes.rf"), comfy.pack_module("nodes.flowedit")
    from tests.support.tiny_models import tiny_flux_model
    model = tiny_flux_model()
    latent = {"samples": torch.randn(2, 16, 8, 8), "noise_mask": torch.ones(mask_shape)}
    cond = [[torch.zeros(1, 8, FLUX["width"]), {"pooled_output": torch.zeros(1, FLUX["pooled_width"])}]]
    with pytest.raises(ValueError, match=f"latent's noise_mask.*{words}"):
        rf.rf_inversion_edit(model, cond, cond, None, latent, 2, "simple", 1.0, 0.5, 0.9, 0.0, 0.25, 0)
    with pytest.raises(ValueError, match=f"latent's noise_mask.*{words}"):
        flowedit.FlowEdit.execute(model, cond, cond, cond, 1.0, 1.0, latent, 2, "simple", 2, 0, 1, 0)


def test_flowedit_with_the_source_prompt_as_target_returns_the_source(comfy):
    # equal prompts and cfg give equal predictions: the velocity gap is exactly 0 at every step
    g = Graph()
    model, src, _, source = _setup(g)
    g.node("EITestCapture", label="same", latent=g.node(
        "FlowEdit", model=model, source=src, target=src, negative=src, source_cfg=2.0, target_cfg=2.0, latent=source,
        steps=4, scheduler="simple", n_max=3, n_min=0, n_avg=2, seed=0).out)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    assert (result.capture("same")["latent"] - result.capture("source")["latent"]).abs().max() < 1e-5


def test_flowedit_refuses_an_eps_model_pointing_to_invert_latent(comfy):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out
    cond = random_conditioning(g, SD15, seed=1)
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1).out
    g.node("EITestCapture", label="never", latent=g.node(
        "FlowEdit", model=model, source=cond, target=cond, negative=cond, source_cfg=1.0, target_cfg=1.0,
        latent=latent, steps=2, scheduler="simple", n_max=2, n_min=0, n_avg=1, seed=0).out)
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "FlowEdit needs a rectified-flow model; this model predicts eps" in result.error, result.error
    assert "Invert Latent" in result.error


def test_masked_flowedit_on_a_video_latent_keeps_its_shape_and_the_unmasked_half(comfy):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_wan21_flow.safetensors", weight_dtype="default").out
    src, tgt = random_conditioning(g, WAN21, seed=1), random_conditioning(g, WAN21, seed=2, scale=3.0)
    empty = g.node("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1).out
    video = g.node("KSampler", model=model, seed=5, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple",
                   positive=src, negative=src, latent_image=empty, denoise=1.0).out
    g.node("EITestCapture", label="source", latent=video)
    masked = g.node("SetLatentNoiseMask", samples=video, mask=_left_half_mask(g)).out
    g.node("EITestCapture", label="video_edit", latent=g.node(
        "FlowEdit", model=model, source=src, target=tgt, negative=src, source_cfg=1.0, target_cfg=3.0,
        latent=masked, steps=3, scheduler="simple", n_max=2, n_min=0, n_avg=1, seed=0).out)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    assert result.capture("video_edit")["latent"].shape == result.capture("source")["latent"].shape == (1, 16, 3, 8, 8)
    outside, inside = _outside_inside(result, "video_edit")
    assert outside <= OUTSIDE_DB and inside > -20, (outside, inside)


def test_a_soft_mask_keeps_the_source_where_it_is_zero(comfy):
    # a feathered MASK (1, then 0.5, then 0 across the width): FlowEdit grades its steps by it, RF-Inversion Edit
    # reads it through ComfyUI's Differential Diffusion, as KSampler does; where it is 0 both return the source
    g = Graph()
    model, src, tgt, source = _setup(g)
    half = g.node("SolidMask", value=0.5, width=16, height=64).out
    soft = g.node("MaskComposite", destination=_left_half_mask(g), source=half, x=16, y=0, operation="multiply").out
    masked = g.node("SetLatentNoiseMask", samples=source, mask=soft).out
    g.node("EITestCapture", label="flowedit_soft", latent=g.node(
        "FlowEdit", model=model, source=src, target=tgt, negative=src, source_cfg=1.0, target_cfg=3.0, latent=masked,
        steps=4, scheduler="simple", n_max=4, n_min=1, n_avg=1, seed=0).out)   # n_min: the sampling phase too
    graded = g.node("DifferentialDiffusion", model=model).out
    g.node("EITestCapture", label="rf_soft", latent=g.node(
        "RFInversionEdit", model=graded, source=src, target=tgt, latent=masked, steps=4, scheduler="simple", cfg=1.0,
        gamma=0.5, eta=0.9, start=0.0, stop=0.25, seed=0).out)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    for label in ("flowedit_soft", "rf_soft"):
        outside, inside = _outside_inside(result, label)
        assert outside <= OUTSIDE_DB and inside > -20, (label, outside, inside)
