"""Import-only stand-in (see torchaudio/__init__.py)."""

from torchaudio._stub import getattr_for  # noqa: E402

__getattr__ = getattr_for(__name__)
