"""Real trained weights and the newer ComfyUI that live outside the project, in `../shared` beside the clone.

Nothing here is copied into the repository: tests and benchmarks point ComfyUI at these folders. Where one is
absent, `missing_reason()` gives the one-line reason a test skips with.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")


def shared_dir() -> Path:
    """EXACT_INVERSION_SHARED, else the `shared` folder beside the clone (where CI puts it)."""
    return Path(os.environ.get("EXACT_INVERSION_SHARED") or REPO.parent / "shared")


def taef2_dir() -> Path:
    """The folder holding FLUX.2's tiny autoencoder, for ComfyUI's `vae_approx` search path."""
    return shared_dir() / "weights" / "taef2"


def comfyui_033_dir() -> Path:
    return shared_dir() / "comfyui-0.33.0"


def taef2_missing_reason():
    """None where taef2 is there, else why a test that needs it skips."""
    missing = [f for f in TAEF2_FILES if not (taef2_dir() / f).is_file()]
    return f"taef2 weights not found in {taef2_dir()} ({', '.join(missing)})" if missing else None


def register_taef2():
    """Make VAELoader list `taef2` in this (in-process) ComfyUI; returns the VAE name to load."""
    import folder_paths
    folder_paths.add_model_folder_path("vae_approx", str(taef2_dir()))
    return "taef2"


def shared_model_paths_args(base):
    """main.py arguments that make a server list taef2 too (an extra_model_paths.yaml in `base`); none without it."""
    if taef2_missing_reason():
        return []
    config = Path(base) / "shared_model_paths.yaml"
    config.write_text(f"exact_inversion_shared:\n    vae_approx: {taef2_dir()}\n")
    return ["--extra-model-paths-config", str(config)]
