"""The tiny FLUX.2-layout model as files ComfyUI's own loaders read, for the tests and benchmarks that run on
ComfyUI 0.33 (FLUX.2's model class and taef2 exist there only).

The files live in a cache folder of their own, keyed on ComfyUI's version and the builder's source, because the
shared tiny-models folder is built by whichever ComfyUI comes first. `register_flux2()` adds that folder and
taef2's to this process's `folder_paths`, as `register_taef2()` does for the VAE.
"""
import hashlib
import os
from pathlib import Path

from .comfy_runtime import REPO, _cache_root
from .real_weights import register_taef2, taef2_missing_reason
from .tiny_models import FLUX2_TRAINED, _strip, clip_l_state_dict, flux2_state_dict, has_flux2

RANDOM_UNET = "tiny_flux2_random.safetensors"
TRAINED_UNET = "tiny_flux2_trained.safetensors"
TEXT_ENCODER = "tiny_clip_l.safetensors"
FLUX_GUIDANCE = 4.0      # FluxGuidance's value in ComfyUI's FLUX.2 templates


def flux2_missing_reason():
    """None where this ComfyUI builds FLUX.2 and taef2 is there, else the one-line reason a test skips."""
    return has_flux2() or taef2_missing_reason()


def flux2_models_dir() -> Path:
    """diffusion_models/ (random and trained tiny FLUX.2) and text_encoders/ (the tiny CLIP-L), built once."""
    import comfyui_version
    sources = [REPO / "tests" / "support" / "tiny_models.py", Path(__file__)]
    sources += [Path(FLUX2_TRAINED)] if os.path.exists(FLUX2_TRAINED) else []
    digest = hashlib.sha256(comfyui_version.__version__.encode() + b"".join(p.read_bytes() for p in sources))
    out = _cache_root() / f"flux2-{digest.hexdigest()[:16]}"
    if not (out / ".ready").exists():
        _build(out)
        (out / ".ready").touch()
    return out


def _build(out):
    import shutil
    import torch
    from safetensors.torch import save_file
    for sub in ("diffusion_models", "text_encoders"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    random = {k: v.to(torch.float16) for k, v in flux2_state_dict().items()}
    save_file(random, str(out / "diffusion_models" / RANDOM_UNET))
    if os.path.exists(FLUX2_TRAINED):
        shutil.copyfile(FLUX2_TRAINED, out / "diffusion_models" / TRAINED_UNET)
    # CLIP-L in the layout of the released clip_l.safetensors (what CLIPLoader reads)
    save_file(_strip(clip_l_state_dict(), "transformer."), str(out / "text_encoders" / TEXT_ENCODER))


def register_flux2():
    """Make UNETLoader, CLIPLoader and VAELoader list the tiny FLUX.2 files and taef2 in this process."""
    import folder_paths
    folder = flux2_models_dir()
    for kind in ("diffusion_models", "text_encoders"):
        folder_paths.add_model_folder_path(kind, str(folder / kind))
    register_taef2()
    return folder


def load_flux2(trained=True):
    """(MODEL, CLIP, VAE) through ComfyUI's UNETLoader, CLIPLoader and VAELoader."""
    import nodes
    register_flux2()
    unet = TRAINED_UNET if trained else RANDOM_UNET
    model = nodes.UNETLoader().load_unet(unet, "default")[0]
    clip = nodes.CLIPLoader().load_clip(TEXT_ENCODER, "stable_diffusion")[0]
    vae = nodes.VAELoader().load_vae("taef2")[0]
    return model, clip, vae


def flux2_conditioning(clip, text, guidance=FLUX_GUIDANCE):
    """CLIPTextEncode then FluxGuidance, as FLUX.2 workflows condition."""
    import node_helpers
    import nodes
    cond = nodes.CLIPTextEncode().encode(clip, text)[0]
    return node_helpers.conditioning_set_values(cond, {"guidance": guidance})
