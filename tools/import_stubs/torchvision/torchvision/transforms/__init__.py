"""Import-only stand-in (see torchvision/__init__.py)."""

from . import functional  # noqa: E402,F401  a real submodule, not a placeholder

from torchvision._stub import getattr_for  # noqa: E402

__getattr__ = getattr_for(__name__)
