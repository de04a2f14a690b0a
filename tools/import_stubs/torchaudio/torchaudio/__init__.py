"""Import-only stand-in for torchaudio (like tools/import_stubs/torchvision).

Newer ComfyUI imports torchaudio at start-up (comfy/sd.py -> audio VAEs); PyPI has no torchaudio for
the CPU torch the tests use, and nothing this pack tests touches audio. Appended to sys.path: a real
torchaudio still wins.
"""
__version__ = "0.0.0+stub"


def __getattr__(name):
    raise AttributeError(f"torchaudio.{name} is unavailable: this is the test runtime's import-only stub")
