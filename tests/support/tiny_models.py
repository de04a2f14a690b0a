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
    if trained_vae and os.path.exists(trained_vae):
        dest = os.path.join(models_dir, "vae", os.path.basename(trained_vae))
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(trained_vae, dest)
        written.append(dest)
    return written


# Names users have in their own ComfyUI, mapped onto the tiny models, so that the shipped example
# workflows run unchanged in tests and in `make demo`.
USER_MODEL_ALIASES = {
    "checkpoints/v1-5-pruned-emaonly.safetensors": "checkpoints/tiny_sd15_clip.safetensors",
    "checkpoints/sd3.5_medium.safetensors": "checkpoints/tiny_sd3_clip.safetensors",
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
