"""ComfyUI V3 adapters: each node turns MODEL / VAE / CONDITIONING / SIGMAS into the callables
that the pure-torch functions in `inversion_ops` take."""
from .sigmas import InversionSigmas

NODE_LIST = [
    InversionSigmas,
]
