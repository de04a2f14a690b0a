"""Import-only stand-in for torchvision.

comfy.sd imports torchvision at module level, but PyPI's torchvision does not load beside
the CPU torch build used in tests. Nothing this pack or its tests run touches torchvision.
This folder is appended to sys.path by a .pth file, so a real torchvision still wins.
"""
__version__ = "0.0.0+stub"
from . import models, ops, transforms  # noqa: E402,F401
