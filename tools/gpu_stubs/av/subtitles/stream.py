from .. import _Unavailable as SubtitleStream  # noqa: F401
