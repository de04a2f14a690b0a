"""Import-only stand-in (see torchvision/__init__.py)."""

from . import optical_flow  # noqa: E402,F401  a real submodule, not a placeholder


def __getattr__(name):
    """Any name imports (ComfyUI does `from torchvision.models import x` at start-up); using it raises."""
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision.models.{name} is unavailable: this is the test runtime's import-only stub")
    return unavailable
