"""Tiny random-weight models built through ComfyUI's own classes, for tests, demo and benchmarks.

Weights come from a fixed seed, so every build is identical; nothing here is committed.
`build_model_files(models_dir)` writes the files that ComfyUI's own loaders read:
  vae_approx/taesd_{encoder,decoder}.safetensors   4-channel TAESD  (VAELoader "taesd")
  vae_approx/taesd3_{encoder,decoder}.safetensors 16-channel TAESD (VAELoader "taesd3")
  unet/tiny_sd15_eps.safetensors    SD1.5-layout UNet, 1 level, 1 res-block   (UNETLoader, EPS)
  unet/tiny_sd3_flow.safetensors    SD3-layout MMDiT, depth 2, hidden 128      (UNETLoader, CONST)
  checkpoints/tiny_sd15.safetensors the SD1.5 UNet + the 4-channel TAESD     (CheckpointLoaderSimple)
  checkpoints/tiny_sd3.safetensors  the SD3 MMDiT + the 16-channel TAESD     (CheckpointLoaderSimple)
  checkpoints/tiny_sd15_clip.safetensors, tiny_sd3_clip.safetensors  the same plus a random CLIP-L text
      encoder (fp16, 123M params), so CLIPTextEncode works; the user-named aliases point at these.
      tiny_sd15_clip carries the trained tiny VAE instead of the random TAESD when it is given.
  vae/tiny_taesd_trained.safetensors the trained tiny VAE shipped in models/ (VAELoader), if present
  checkpoints/tiny_sd15_trained.safetensors, tiny_sd3_trained.safetensors, vae/tiny_taesd3_trained.safetensors
      the models trained on the emoji set (tools/train_models.py, models/README.md), assembled from models/
Flux detection forces hidden 3072, so the tiny Flux is built in-process only (`tiny_flux_model`).
Import this module only after ComfyUI is importable (COMFYUI_DIR on sys.path).
"""
import math
import os
import shutil

import torch

SEED = 20241122
SD15_CONTEXT_DIM = 768     # conditioning width the tiny SD1.5 UNet expects
SD3_CONTEXT_DIM = 4096     # what ComfyUI's SD3 text encoders produce
SD3_POOLED_DIM = 2048
FLUX_CONTEXT_DIM = 64
WAN21_CONTEXT_DIM = 4096   # umt5-xxl's width
FLUX_POOLED_DIM = 32

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [1], "channel_mult": [1],
    "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_linear_in_transformer": False, "context_dim": SD15_CONTEXT_DIM, "num_heads": 8,
    "num_head_channels": -1, "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD3_MMDIT_CONFIG = {   # depth is read back as hidden // 64 by ComfyUI's detection
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": SD3_POOLED_DIM, "pos_embed_max_size": 32, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": SD3_CONTEXT_DIM, "out_features": 128}},
}
WAN21_CONFIG = {   # detection reads heads as dim // 128, layers and widths from the weights' shapes
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 128,
    "ffn_dim": 256, "freq_dim": 256, "text_dim": WAN21_CONTEXT_DIM, "out_dim": 16, "num_heads": 1,
    "num_layers": 1, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
# FLUX.2 layout (what model_detection reads back as "flux2"): 128-channel packed latents, patch 1, global
# modulation, no biases, heads of 128 (axes 4 x 32); CLIP-L's 768-wide output as the text input.
FLUX2_CONFIG = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
    "context_in_dim": SD15_CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 3.0, "num_heads": 1,
    "depth": 1, "depth_single_blocks": 1, "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1,
    "qkv_bias": False, "guidance_embed": True, "txt_ids_dims": [3], "global_modulation": True,
    "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
}
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_POOLED_DIM,
    "context_in_dim": FLUX_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
    "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def _seeded_init(module, seed):
    """Deterministic fan-in-scaled weights (ComfyUI's ops skip torch's own init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return module


def taesd_state_dict(latent_channels, seed=SEED):
    """TAESD encoder/decoder weights as ComfyUI's vae_approx files hold them (no prefix)."""
    import comfy.taesd.taesd as taesd
    model = _seeded_init(taesd.TAESD(latent_channels=latent_channels), seed + latent_channels)
    # Random weights can push activations far out; shrink the last conv so images stay in range.
    enc = {k: v.contiguous() for k, v in model.taesd_encoder.state_dict().items()}
    dec = {k: v.contiguous() for k, v in model.taesd_decoder.state_dict().items()}
    return enc, dec


def _model_state_dict(config_cls, unet_config, seed):
    """Build a diffusion model through ComfyUI's model config, return its prefixed state dict."""
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.")
    _seeded_init(model.diffusion_model, seed)
    return {"model.diffusion_model." + k: v.contiguous()
            for k, v in model.diffusion_model.state_dict().items()}


def sd15_unet_state_dict(seed=SEED):
    import comfy.supported_models as sm
    return _model_state_dict(sm.SD15, SD15_UNET_CONFIG, seed)


def sd3_mmdit_state_dict(seed=SEED):
    import comfy.supported_models as sm
    return _model_state_dict(sm.SD3, SD3_MMDIT_CONFIG, seed + 3)


def has_flux2():
    """None where this ComfyUI builds FLUX.2 models, else the one-line reason a test skips."""
    import dataclasses
    import comfy.ldm.flux.model
    import comfy.supported_models as sm
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if not hasattr(sm, "Flux2") or not {"txt_ids_dims", "global_modulation", "ops_bias"} <= fields:
        return "this ComfyUI cannot build the FLUX.2 layout this model uses (ComfyUI 0.33 or later can)"
    return None


def flux2_state_dict(seed=SEED):
    """A FLUX.2-layout transformer (no prefix), the start of the trained tiny FLUX.2 (tools/train_models.py)."""
    import comfy.supported_models as sm
    sd = _strip(_model_state_dict(sm.Flux2, FLUX2_CONFIG, seed + 2), "model.diffusion_model.")
    sd["final_layer.linear.weight"].zero_()    # the model starts by predicting zero velocity (as DiTs start)
    return sd


def wan21_state_dict(seed=SEED):
    """A Wan 2.1 T2V video model (flow, 3-D latents), 0.9M parameters, detected by UNETLoader."""
    import comfy.supported_models as sm
    return _model_state_dict(sm.WAN21_T2V, WAN21_CONFIG, seed + 21)


def wan21_vae_state_dict(seed=SEED):
    """A Wan 2.1 video VAE (causal 3-D, 16 latent channels, 8x space and 4x time) at width 8 instead of
    96; ComfyUI's VAE loader reads the width back from the weights."""
    import comfy.ldm.wan.vae
    model = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True], dropout=0.0)
    _seeded_init(model, seed + 22)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def tiny_flux_model(seed=SEED):
    """A tiny Flux wrapped in a ModelPatcher (ModelSamplingFlux), in-process only."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import dataclasses

    import comfy.ldm.flux.model
    config = dict(FLUX_CONFIG)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []   # newer ComfyUI: required; empty is the Flux.1 layout (no text ids)
    cfg = sm.Flux(config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    _seeded_init(model.diffusion_model, seed + 7)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def clip_l_state_dict(seed=SEED):
    """Random CLIP-L text-encoder weights (`transformer.text_model.*`, fp16), built through ComfyUI's
    own SDClipModel, so that its loaders and CLIPTextEncode accept them. 123M parameters: CLIP-L's
    width and depth are fixed by ComfyUI's config, only the values are ours."""
    import comfy.sd1_clip
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    text_model = _seeded_init(clip.transformer.text_model, seed + 11)
    return {"transformer.text_model." + k: v.to(torch.float16).contiguous()
            for k, v in text_model.state_dict().items()}


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_model_files(models_dir, trained_vae=None):
    """Write every tiny model file under models_dir (idempotent: existing files are kept)."""
    from safetensors.torch import save_file
    written = []

    def save(sd, *parts):
        path = os.path.join(models_dir, *parts)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(sd, path + ".tmp")
            os.replace(path + ".tmp", path)
        written.append(path)

    taesd = {}
    for name, channels in (("taesd", 4), ("taesd3", 16)):
        enc, dec = taesd_state_dict(channels)
        save(enc, "vae_approx", f"{name}_encoder.safetensors")
        save(dec, "vae_approx", f"{name}_decoder.safetensors")
        taesd[channels] = {**{"taesd_encoder." + k: v for k, v in enc.items()},
                           **{"taesd_decoder." + k: v for k, v in dec.items()}}
    sd15 = sd15_unet_state_dict()
    sd3 = sd3_mmdit_state_dict()
    save(_strip(sd15, "model.diffusion_model."), "unet", "tiny_sd15_eps.safetensors")
    save(_strip(sd3, "model.diffusion_model."), "unet", "tiny_sd3_flow.safetensors")
    save(_strip(wan21_state_dict(), "model.diffusion_model."), "unet", "tiny_wan21_flow.safetensors")
    save(wan21_vae_state_dict(), "vae", "tiny_wan21_vae.safetensors")
    # Checkpoints carry a VAE under first_stage_model.; the TAESD layout is auto-detected there.
    save({**sd15, **{"first_stage_model." + k: v for k, v in taesd[4].items()}},
         "checkpoints", "tiny_sd15.safetensors")
    save({**sd3, **{"first_stage_model." + k: v for k, v in taesd[16].items()}},
         "checkpoints", "tiny_sd3.safetensors")
    # The checkpoints that the example workflows load by users' names also carry CLIP-L: SD1.5 keeps it
    # under cond_stage_model.; SD3 under text_encoders.clip_l. (clip_l alone: context padded to 4096,
    # pooled = 768 from CLIP-L + 1280 zeros, which is what the tiny MMDiT takes).
    clip_l = clip_l_state_dict()
    # SD1.5's user-named checkpoint takes the trained tiny VAE when there is one, so images that the
    # example workflows reconstruct are comparable with their input (a random decoder cannot draw them).
    sd15_vae = taesd[4]
    if trained_vae and os.path.exists(trained_vae):
        from safetensors.torch import load_file
        sd15_vae = load_file(trained_vae)
    save({**sd15, **{"first_stage_model." + k: v for k, v in sd15_vae.items()},
          **{"cond_stage_model." + k: v for k, v in clip_l.items()}},
         "checkpoints", "tiny_sd15_clip.safetensors")
    save({**sd3, **{"first_stage_model." + k: v for k, v in taesd[16].items()},
          **{"text_encoders.clip_l." + k: v for k, v in clip_l.items()}},
         "checkpoints", "tiny_sd3_clip.safetensors")
    if all(os.path.exists(f) for f in TRAINED_FILES):
        # The trained models (models/README.md), as files users' loaders read: checkpoints with CLIP-L.
        vae4, vae16 = trained_vae_state_dict(4), trained_vae_state_dict(16)
        save(vae16, "vae", "tiny_taesd3_trained.safetensors")
        save({**{"model.diffusion_model." + k: v for k, v in trained_sd15_state_dict().items()},
              **{"first_stage_model." + k: v for k, v in vae4.items()},
              **{"cond_stage_model." + k: v for k, v in clip_l.items()}},
             "checkpoints", "tiny_sd15_trained.safetensors")
        from safetensors.torch import load_file
        save({**{"model.diffusion_model." + k: v for k, v in load_file(SD3_TRAINED).items()},
              **{"first_stage_model." + k: v for k, v in vae16.items()},
              **{"text_encoders.clip_l." + k: v for k, v in clip_l.items()}},
             "checkpoints", "tiny_sd3_trained.safetensors")
    if trained_vae and os.path.exists(trained_vae):
        dest = os.path.join(models_dir, "vae", os.path.basename(trained_vae))
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(trained_vae, dest)
        written.append(dest)
    return written


# ---------------------------------------------------------------- trained models (tools/train_models.py)
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")
TRAINED_VAE4 = os.path.join(MODELS, "tiny_taesd_trained.safetensors")
VAE16_DELTA = os.path.join(MODELS, "tiny_taesd3_trained_delta.safetensors")
SD15_DELTA = os.path.join(MODELS, "tiny_sd15_trained_delta.safetensors")
SD3_TRAINED = os.path.join(MODELS, "tiny_sd3_trained.safetensors")
FLUX2_TRAINED = os.path.join(MODELS, "tiny_flux2_trained.safetensors")
TRAINED_FILES = (TRAINED_VAE4, VAE16_DELTA, SD15_DELTA, SD3_TRAINED)
# The 16-channel VAE differs from the 4-channel one only next to the latent.
VAE16_TRAINED_KEYS = ("taesd_encoder.13.", "taesd_encoder.14.", "taesd_decoder.1.", "taesd_decoder.3.")
# The SD1.5-layout UNet is 25.8 M parameters (model_channels 320 is what ComfyUI detects as SD1.5), too
# many to train on a CPU or commit. Its middle block and both output blocks' residual branches are zero
# (exact identities); the input level, the output skip convs and the head are trained and stored;
# everything else keeps the seeded values of `sd15_unet_state_dict`.
SD15_FROZEN_ZERO = ("middle_block.0.out_layers.3.", "middle_block.1.proj_out.", "middle_block.2.out_layers.3.",
                    "output_blocks.0.0.out_layers.3.", "output_blocks.0.1.proj_out.",
                    "output_blocks.1.0.out_layers.3.", "output_blocks.1.1.proj_out.")
SD15_TRAINED_PREFIXES = ("input_blocks.0.", "input_blocks.1.", "output_blocks.0.0.skip_connection.",
                         "output_blocks.1.0.skip_connection.", "out.")


def widen_taesd(sd4, channels, generator):
    """A 4-channel TAESD state dict widened to `channels` latent channels: the encoder's extra outputs
    start small and random, the decoder ignores them (zero weights) until trained."""
    sd = {k: v.float().clone() for k, v in sd4.items()}
    w, b = sd["taesd_encoder.14.weight"], sd["taesd_encoder.14.bias"]
    extra = channels - w.shape[0]
    sd["taesd_encoder.14.weight"] = torch.cat([w, 1e-2 * torch.randn((extra,) + w.shape[1:], generator=generator)])
    sd["taesd_encoder.14.bias"] = torch.cat([b, torch.zeros(extra)])
    w = sd["taesd_decoder.1.weight"]
    sd["taesd_decoder.1.weight"] = torch.cat([w, torch.zeros((w.shape[0], extra) + w.shape[2:])], 1)
    return sd


def trained_vae_state_dict(channels):
    """The trained tiny TAESD (4 channels), or the 16-channel one assembled from it and its delta."""
    from safetensors.torch import load_file
    sd4 = load_file(TRAINED_VAE4)
    if channels == 4:
        return sd4
    sd = widen_taesd(sd4, 16, torch.Generator().manual_seed(0))
    sd.update({k: v.float() for k, v in load_file(VAE16_DELTA).items()})
    return {k: v.to(torch.float16) for k, v in sd.items()}


def trained_sd15_base(seed=SEED):
    """The seeded SD1.5-layout UNet with the frozen branches zeroed: what training starts from."""
    sd = _strip(sd15_unet_state_dict(seed), "model.diffusion_model.")
    for k in sd:
        if k.startswith(SD15_FROZEN_ZERO):
            sd[k] = torch.zeros_like(sd[k])
    return sd


def trained_sd15_state_dict():
    from safetensors.torch import load_file
    sd = trained_sd15_base()
    sd.update({k: v.float() for k, v in load_file(SD15_DELTA).items()})
    return {k: v.to(torch.float16) for k, v in sd.items()}


def sd15_sparse_forward(unet, x, timesteps, context):
    """ComfyUI's SD1.5 UNet forward without the zeroed branches (training shortcut; it equals the full
    forward, which tools/train_models.py checks before and after training)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding
    options = {"original_shape": list(x.shape), "transformer_index": 0, "block": ("input", 1)}
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    h0 = forward_timestep_embed(unet.input_blocks[0], x, emb, context, options)
    h1 = forward_timestep_embed(unet.input_blocks[1], h0, emb, context, options)
    h = unet.output_blocks[0][0].skip_connection(torch.cat([h1, h1], 1))   # middle block: identity
    h = unet.output_blocks[1][0].skip_connection(torch.cat([h, h0], 1))
    return unet.out(h)


CAPTION_EMBEDDINGS = os.path.join(MODELS, "caption_embeddings.json")


def state_dict_sha256(sd):
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def embedding_fingerprint(cond, pooled):
    """Six numbers per caption: the cond and pooled embeddings projected on fixed random directions
    (CPU generator), so a stored file can check that a fresh build encodes captions as training did."""
    g = torch.Generator().manual_seed(0)
    cond, pooled = cond.flatten(1).float().cpu(), pooled.flatten(1).float().cpu()
    p = torch.randn(cond.shape[1], 4, generator=g) / math.sqrt(cond.shape[1])
    q = torch.randn(pooled.shape[1], 2, generator=g) / math.sqrt(pooled.shape[1])
    return torch.cat([cond @ p, pooled @ q], 1)


def caption_embeddings(layout, captions):
    """CLIPTextEncode's (cond, pooled) for each caption through the CLIP-L that the tiny checkpoints carry,
    computed once and cached (the training scripts' conditioning)."""
    import hashlib
    import json
    import comfy.sd
    from tests.support.comfy_runtime import tiny_models_dir
    folder = tiny_models_dir()
    key = hashlib.sha256(json.dumps([layout, list(captions), folder.name]).encode()).hexdigest()[:16]
    path = folder / f"embeddings-{layout}-{key}.pt"
    if path.exists():
        return torch.load(path)
    ckpt = folder / "checkpoints" / f"tiny_{layout}_clip.safetensors"
    clip = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_model=False)[1]
    conds, pooled = zip(*(clip.encode_from_tokens(clip.tokenize(c), return_pooled=True) for c in captions))
    out = {"captions": list(captions), "cond": torch.cat(conds).float(), "pooled": torch.cat(pooled).float()}
    torch.save(out, path)
    return out


# Names users have in their own ComfyUI, mapped onto the tiny models, so that the shipped example
# workflows run unchanged in tests and in `make demo`.
USER_MODEL_ALIASES = {
    "checkpoints/v1-5-pruned-emaonly.safetensors": "checkpoints/tiny_sd15_trained.safetensors",
    "checkpoints/sd3.5_medium.safetensors": "checkpoints/tiny_sd3_trained.safetensors",
    "unet/v1-5-unet.safetensors": "unet/tiny_sd15_eps.safetensors",
    "unet/sd3.5_medium.safetensors": "unet/tiny_sd3_flow.safetensors",
}


def link_user_aliases(models_dir):
    for alias, target in USER_MODEL_ALIASES.items():
        path = os.path.join(models_dir, alias)
        if not os.path.lexists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(os.path.join(models_dir, target), path)


def main(argv=None):
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Build the tiny models into a ComfyUI models folder.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trained-vae", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    for path in build_model_files(args.out, args.trained_vae):
        print(path)
    link_user_aliases(args.out)


if __name__ == "__main__":
    main()
