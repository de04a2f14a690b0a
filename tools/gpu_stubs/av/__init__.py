"""Import-only stand-in for PyAV on the GPU check machine (its 36 MB wheel would not fit the 64 MiB
that travels there). ComfyUI's comfy_api imports av at start-up; nothing this pack tests decodes video.
A real av, if installed, wins: this folder is appended to sys.path."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed on this machine (tools/gpu_stubs)")

    @classmethod
    def from_ndarray(cls, *args, **kwargs):
        cls()


AudioFrame = VideoFrame = AudioStream = VideoStream = _Unavailable
time_base = 1000000


def open(*args, **kwargs):  # noqa: A001 - PyAV's own name
    raise RuntimeError("PyAV is not installed on this machine (tools/gpu_stubs)")
