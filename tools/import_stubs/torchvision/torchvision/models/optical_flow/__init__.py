"""Import-only stand-in (see torchvision/__init__.py)."""


def __getattr__(name):
    """Any name imports (ComfyUI does `from torchvision.models.optical_flow import x` at start-up); using it raises."""
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"torchvision.models.optical_flow.{name} is unavailable: this is the test runtime's import-only stub")
    return unavailable
