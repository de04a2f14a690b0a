"""The placeholder every module of this import-only stub answers with (see __init__.py)."""


def getattr_for(module_name):
    """A module __getattr__: any name imports (ComfyUI does `from torchaudio.x import y` at start-up); using it
    raises. Dunder names stay missing, so Python's own probes behave."""
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{module_name}.{name} is unavailable: this is the test runtime's import-only stub")
        return unavailable
    return __getattr__
