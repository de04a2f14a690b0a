"""Backpropagation through ComfyUI's model keeping one block's activations at a time (activation
checkpointing): a clone of the MODEL whose object patches swap each block of the diffusion model for a
twin that, with grad enabled, keeps only its inputs and recomputes the rest in the backward pass
(torch.utils.checkpoint). Generic over layouts: the blocks are found from torch's container types.
The incoming MODEL gets no patch; loading it again puts its own blocks back.
"""
import contextlib
import copy

import comfy.model_management
import torch
import torch.utils.checkpoint

ROOT = "diffusion_model"


def blocks(diffusion_model):
    """(path, module) for the units a diffusion model's forward runs one after another: the elements of
    its ModuleList / Sequential children (UNet input_blocks / middle_block / output_blocks, MMDiT
    joint_blocks, Flux double_blocks / single_blocks, Wan blocks). A Sequential element gives its own
    children, since callers may iterate it rather than call it (the UNet's forward_timestep_embed does);
    so does a nested ModuleList.
    Leaf layers are left out: checkpointing one keeps its input, as autograd does anyway."""
    for name, container in diffusion_model.named_children():
        if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        for index, element in container.named_children():
            nested = isinstance(element, (torch.nn.Sequential, torch.nn.ModuleList))
            units = element.named_children() if nested else [(None, element)]
            for sub, unit in units:
                if next(unit.children(), None) is not None:
                    yield ".".join(p for p in (name, index, sub) if p is not None), unit


def _as_now(value):
    return dict(value) if isinstance(value, dict) else value


def recomputing_twin(block):
    """A shallow copy of `block`: same class and the same parameter, buffer and child dicts, so
    isinstance checks, state-dict names and ComfyUI's weight patches see the block itself. Only its
    forward differs: with grad enabled it runs under non-reentrant checkpointing."""
    run = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        # the caller goes on writing block indices into dict arguments (transformer_options):
        # the recomputation must see them as this call did
        then = [_as_now(a) for a in args], {k: _as_now(v) for k, v in kwargs.items()}
        first = [True]

        def replay(*a, **k):
            if not first:
                a, k = [_as_now(v) for v in then[0]], {key: _as_now(v) for key, v in then[1].items()}
            first.clear()
            return run(*a, **k)

        return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False, **kwargs)

    twin = copy.copy(block)
    twin.forward = forward
    return twin


def recomputing_clone(patcher):
    """A clone of `patcher` whose object patches put a recomputing twin at every block; `patcher` itself
    where it has no diffusion model, or already patches objects inside it (ours would stack on theirs)."""
    if not hasattr(patcher.model, ROOT) or any(k == ROOT or k.startswith(ROOT + ".") for k in patcher.object_patches):
        return patcher
    clone = patcher.clone()
    for path, block in blocks(patcher.get_model_object(ROOT)):
        clone.add_object_patch(f"{ROOT}.{path}", recomputing_twin(block))
    return clone


@contextlib.contextmanager
def loaded_for_backprop(patchers, recompute=True):
    """Fully load `patchers` (backprop needs every weight resident), the first as a recomputing clone
    when `recompute`; yields the loaded ones. On exit the incoming first patcher is loaded again, which
    unpatches the clone's twins through ComfyUI's own object-patch backup."""
    first = recomputing_clone(patchers[0]) if recompute and patchers else None
    loaded = [first, *patchers[1:]] if first is not None else list(patchers)
    if loaded:
        comfy.model_management.load_models_gpu(loaded, force_full_load=True)
    swapped = first is not None and first is not patchers[0]
    try:
        if swapped:   # unloading the incoming MODEL moved its patches' own models, which the guider uses
            patchers[0].model_patches_to(patchers[0].load_device)
            patchers[0].model_patches_to(patchers[0].model_dtype())
        yield loaded
    finally:
        if swapped:
            comfy.model_management.load_models_gpu(list(patchers), force_full_load=True)
