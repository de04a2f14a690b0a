"""Import-only stand-in (see torchvision/__init__.py)."""

from torchvision._stub import getattr_for  # noqa: E402

__getattr__ = getattr_for(__name__)
