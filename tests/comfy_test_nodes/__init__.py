"""Test-only ComfyUI nodes, installed into custom_nodes by the test harness and the demo only.

- EITestRandomConditioning: seeded random CONDITIONING of a given width, so tests need no text encoder.
- EITestTinyFlux: the tiny Flux MODEL (Flux detection forces hidden 3072, so it has no file).
- EITestCapture: saves a LATENT's, IMAGE's or SIGMAS' tensor to output/captures/<label>.safetensors,
  so in-process and server tests read results the same way.
- EITestJPEG: an IMAGE saved as JPEG at a quality and read back with PIL (ComfyUI has no JPEG round-trip node).
"""
import os

import torch
from comfy_api.latest import ComfyExtension, io

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def _tiny_models():
    """tests/support/tiny_models.py, loaded by path: putting the repo on sys.path would hide a pack module
    that imports `inversion_ops` absolutely instead of relatively (as users' installs would fail)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("exact_inversion_tiny_models",
                                                  os.path.join(_REPO, "tests", "support", "tiny_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EITestRandomConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EITestRandomConditioning", category="testing/exact_inversion",
            inputs=[
                io.Int.Input("width", default=768, min=1, max=8192),
                io.Int.Input("tokens", default=8, min=1, max=512),
                io.Int.Input("pooled_width", default=0, min=0, max=8192),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31),
                io.Int.Input("batch", default=1, min=1, max=64),
                io.Float.Input("scale", default=1.0, min=0.0, max=100.0),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, width, tokens, pooled_width, seed, batch, scale):
        g = torch.Generator().manual_seed(seed)
        cond = scale * torch.randn(batch, tokens, width, generator=g)
        extra = {}
        if pooled_width:
            extra["pooled_output"] = scale * torch.randn(batch, pooled_width, generator=g)
        return io.NodeOutput([[cond, extra]])


class EITestTinyFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="EITestTinyFlux", category="testing/exact_inversion",
                         inputs=[], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls):
        return io.NodeOutput(_tiny_models().tiny_flux_model())


class EITestCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EITestCapture", category="testing/exact_inversion", is_output_node=True,
            inputs=[io.String.Input("label", default="capture"),
                    io.Latent.Input("latent", optional=True),
                    io.Image.Input("image", optional=True),
                    io.Sigmas.Input("sigmas", optional=True),
                    io.Conditioning.Input("conditioning", optional=True)],
            outputs=[],
        )

    @classmethod
    def execute(cls, label, latent=None, image=None, sigmas=None, conditioning=None):
        import folder_paths
        from safetensors.torch import save_file
        tensors = {}
        if latent is not None:
            tensors["latent"] = latent["samples"]
        if image is not None:
            tensors["image"] = image
        if sigmas is not None:
            tensors["sigmas"] = sigmas
        if conditioning is not None:
            tensors["cond"] = conditioning[0][0]
            tensors["pooled"] = conditioning[0][1]["pooled_output"]
        folder = os.path.join(folder_paths.get_output_directory(), "captures")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{label}.safetensors")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
        return io.NodeOutput(ui={"captured": [path]})


class EITestJPEG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="EITestJPEG", category="testing/exact_inversion",
                         inputs=[io.Image.Input("image"), io.Int.Input("quality", default=75, min=1, max=100)],
                         outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, image, quality):
        import io as bytes_io

        import numpy as np
        from PIL import Image
        out = []
        for frame in image:
            buffer = bytes_io.BytesIO()
            pixels = (frame[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            out.append(torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255))
        return io.NodeOutput(torch.stack(out))


class TestNodes(ComfyExtension):
    async def get_node_list(self):
        return [EITestRandomConditioning, EITestTinyFlux, EITestCapture, EITestJPEG]


async def comfy_entrypoint():
    return TestNodes()
