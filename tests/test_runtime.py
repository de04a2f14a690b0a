"""The foundation: a real ComfyUI loads the pack, runs its nodes in-process and as a server,
loads every tiny model through its own loaders, and converts shared UI workflows."""
import json
import math
from pathlib import Path

import pytest
import torch

from prompts import FLUX, SD3, SD15, Graph, random_conditioning
from tools.workflow_api import WorkflowError, ui_to_api

DATA = Path(__file__).parent / "data"


def test_pack_node_runs_in_process(comfy):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out
    sigmas = g.node("InversionSigmas", model=model, scheduler="normal", steps=4, denoise=1.0).out
    g.node("EITestCapture", label="inproc_sigmas", sigmas=sigmas)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    sigmas = result.capture("inproc_sigmas")["sigmas"]
    assert sigmas.shape == (5,)
    assert sigmas[0] == 0 and torch.all(sigmas[1:] > sigmas[:-1]), "ascending from 0"
    assert math.isclose(float(sigmas[-1]), 14.6146, rel_tol=1e-3), "SD1.5 sigma_max"


def test_pack_node_runs_on_server(comfy_server):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd3_flow.safetensors", weight_dtype="default").out
    sigmas = g.node("InversionSigmas", model=model, scheduler="simple", steps=3, denoise=0.5).out
    g.node("EITestCapture", label="server_sigmas", sigmas=sigmas)
    result = comfy_server.run(g.prompt)
    assert result.ok, result.error
    sigmas = result.capture("server_sigmas")["sigmas"]
    assert sigmas.shape == (4,) and sigmas[0] == 0
    assert float(sigmas[-1]) < 1.0, "partial inversion stops below the flow model's sigma_max of 1"


def test_bad_input_gets_an_error_naming_it(comfy):
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out
    sigmas = g.node("InversionSigmas", model=model, scheduler="no_such_scheduler", steps=4, denoise=1.0).out
    g.node("EITestCapture", label="bad", sigmas=sigmas)
    result = comfy.run(g.prompt)
    assert not result.ok
    assert "scheduler" in result.error


def _sample_prompt(g, model, cond_family, latent_channels, label, steps=2, cfg=2.0):
    positive = random_conditioning(g, cond_family, seed=1)
    negative = random_conditioning(g, cond_family, seed=2)
    if latent_channels == 4:
        latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1).out
    else:
        latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1).out
    samples = g.node("KSampler", model=model, seed=3, steps=steps, cfg=cfg, sampler_name="euler",
                     scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                     denoise=1.0).out
    g.node("EITestCapture", label=label, latent=samples)


@pytest.mark.parametrize("name, build", [
    ("sd15_checkpoint", lambda g: (g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")[0], SD15, 4)),
    ("sd15_unet", lambda g: (g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out, SD15, 4)),
    ("sd15_vpred", lambda g: (g.node("ModelSamplingDiscrete", sampling="v_prediction", zsnr=False,
                                     model=g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors",
                                                  weight_dtype="default").out).out, SD15, 4)),
    ("sd3_checkpoint", lambda g: (g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")[0], SD3, 16)),
    ("sd3_unet", lambda g: (g.node("UNETLoader", unet_name="tiny_sd3_flow.safetensors", weight_dtype="default").out, SD3, 16)),
    ("flux_in_process", lambda g: (g.node("EITestTinyFlux").out, FLUX, 16)),
])
def test_tiny_models_sample_through_core_nodes(comfy, name, build):
    g = Graph()
    model, family, channels = build(g)
    _sample_prompt(g, model, family, channels, f"tiny_{name}")
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    latent = result.capture(f"tiny_{name}")["latent"]
    assert latent.shape == (1, channels, 8, 8)
    assert torch.isfinite(latent).all() and latent.std() > 0


@pytest.mark.parametrize("vae_name, channels", [("taesd", 4), ("taesd3", 16),
                                                ("tiny_taesd_trained.safetensors", 4)])
def test_tiny_vaes_load_through_vaeloader(comfy, vae_name, channels):
    g = Graph()
    vae = g.node("VAELoader", vae_name=vae_name).out
    image = g.node("EmptyImage", width=64, height=64, batch_size=1, color=0x336699).out
    latent = g.node("VAEEncode", pixels=image, vae=vae).out
    decoded = g.node("VAEDecode", samples=latent, vae=vae).out
    g.node("EITestCapture", label=f"vae_{vae_name}", latent=latent, image=decoded)
    result = comfy.run(g.prompt)
    assert result.ok, result.error
    captured = result.capture(f"vae_{vae_name}")
    assert captured["latent"].shape == (1, channels, 8, 8)
    assert captured["image"].shape == (1, 64, 64, 3)


def test_ui_workflow_of_core_nodes_converts_and_runs(comfy_server):
    workflow = json.loads((DATA / "core_workflow_ui.json").read_text())
    prompt = ui_to_api(workflow, comfy_server.object_info())
    assert prompt["3"]["inputs"]["seed"] == 5 and prompt["3"]["inputs"]["steps"] == 2, \
        "seed's control_after_generate value must not shift the widgets after it"
    assert "10" not in prompt, "notes are frontend-only"
    result = comfy_server.run(prompt)
    assert result.ok, result.error
    assert result.capture("core_ui_workflow")["latent"].shape == (1, 4, 8, 8)


def test_ui_workflow_with_unknown_node_is_refused(comfy_server):
    workflow = {"nodes": [{"id": 1, "type": "NoSuchNode", "inputs": [], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(workflow, comfy_server.object_info())


def test_invalid_prompt_is_rejected_by_server(comfy_server):
    g = Graph()
    sigmas = g.node("InversionSigmas", model=["99", 0], scheduler="normal", steps=4, denoise=1.0).out
    g.node("EITestCapture", label="never", sigmas=sigmas)
    result = comfy_server.run(g.prompt)
    assert not result.ok
    assert "99" in result.error or "InversionSigmas" in result.error, result.error


def test_twenty_queued_prompts_succeed_without_memory_growth(comfy_server):
    rss = {}
    for i in range(1, 21):
        g = Graph()
        model = g.node("UNETLoader", unet_name="tiny_sd15_eps.safetensors", weight_dtype="default").out
        sigmas = g.node("InversionSigmas", model=model, scheduler="karras", steps=2 + i, denoise=1.0).out
        g.node("EITestCapture", label=f"queue_{i}", sigmas=sigmas)
        result = comfy_server.run(g.prompt)
        assert result.ok, f"prompt {i}: {result.error}"
        assert result.capture(f"queue_{i}")["sigmas"].shape == (3 + i,)
        rss[i] = comfy_server.rss_bytes()
    assert rss[20] <= 1.10 * rss[5], f"RSS grew from {rss[5] >> 20} MiB to {rss[20] >> 20} MiB"


def test_nodes_offer_search_aliases_where_comfyui_supports_them(comfy, comfy_server):
    import dataclasses

    from comfy_api.latest import io
    supported = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}   # 0.33 yes, 0.3.75 no
    info = comfy_server.get_json("/object_info/InvertLatent")["InvertLatent"]
    if supported:
        assert "unsample" in info.get("search_aliases", []), info
    else:
        assert "search_aliases" not in info
