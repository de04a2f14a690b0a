from . import _Unavailable as InputContainer, _Unavailable as OutputContainer  # noqa: F401
