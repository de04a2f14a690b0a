"""Import-only stand-in (see torchvision/__init__.py)."""


def __getattr__(name):
    raise AttributeError(f"torchvision.models.optical_flow.{name} is unavailable: this is the test runtime's import-only stub")
