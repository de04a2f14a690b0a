"""Import-only stand-in for torchaudio (like tools/import_stubs/torchvision).

Newer ComfyUI imports torchaudio at start-up (comfy/sd.py -> audio VAEs); PyPI has no torchaudio for
the CPU torch the tests use, and nothing this pack tests touches audio. Appended to sys.path: a real
torchaudio still wins.
"""
__version__ = "0.0.0+stub"
from . import functional, transforms  # noqa: E402,F401  real submodules, not placeholders


def __getattr__(name):
    """Any name imports (ComfyUI does `from torchaudio import x` at start-up); using it raises."""
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchaudio.{name} is unavailable: this is the test runtime's import-only stub")
    return unavailable
