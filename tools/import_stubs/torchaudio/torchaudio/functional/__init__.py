"""Import-only stand-in (see ../__init__.py).

Newer ComfyUI imports torchaudio at start-up (comfy/sd.py -> audio VAEs); PyPI has no torchaudio for
the CPU torch the tests use, and nothing this pack tests touches audio. Appended to sys.path: a real
torchaudio still wins.
"""
__version__ = "0.0.0+stub"


def __getattr__(name):
    """Any name imports (ComfyUI does `from torchaudio.functional import x` at start-up); using it raises."""
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchaudio.functional.{name} is unavailable: this is the test runtime's import-only stub")
    return unavailable
