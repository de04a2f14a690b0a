"""Import-only stand-in for torchaudio (like tools/import_stubs/torchvision).

Newer ComfyUI imports torchaudio at start-up (comfy/sd.py -> audio VAEs); PyPI has no torchaudio for
the CPU torch the tests use, and nothing this pack tests touches audio. Appended to sys.path: a real
torchaudio still wins.
"""
__version__ = "0.0.0+stub"
from . import functional, transforms  # noqa: E402,F401  real submodules, not placeholders

from torchaudio._stub import getattr_for  # noqa: E402

__getattr__ = getattr_for(__name__)
