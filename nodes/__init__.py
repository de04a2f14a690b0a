"""ComfyUI V3 adapters: each node turns MODEL / VAE / CONDITIONING / SIGMAS into the callables
that the pure-torch functions in `inversion_ops` take."""
from . import decoder, exact, flowedit, preciseinv, reversible, rf, watermark
from .sigmas import InversionSigmas

NODE_LIST = [InversionSigmas, *decoder.NODES, *exact.NODES, *preciseinv.NODES, *reversible.NODES, *rf.NODES,
             *flowedit.NODES, *watermark.NODES]
