"""Exact Inversion for ComfyUI: decoder inversion, exact DDIM/DPM-Solver inversion,
PreciseInv and RF-Inversion as ComfyUI V3 nodes."""
from comfy_api.latest import ComfyExtension


class ExactInversionExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import NODE_LIST
        return NODE_LIST


async def comfy_entrypoint() -> ExactInversionExtension:
    return ExactInversionExtension()
