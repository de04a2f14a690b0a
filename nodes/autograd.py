"""Backpropagating through ComfyUI's model to its input latent: every weight resident, each diffusion-model
block recomputing its activations in the backward pass (activation checkpointing), weights autograd can
use, and a clear refusal where the model still cannot be differentiated. The incoming MODEL gets no patch.
"""
import contextlib
import copy

import comfy.model_management
import comfy.model_patcher
import torch
import torch.utils.checkpoint

ROOT = "diffusion_model"

NOT_DIFFERENTIABLE = (
    "PreciseInv backpropagates through the model with respect to its input latent, and this model "
    "cannot be differentiated: {error} Quantised or custom weight formats, and patches that run the "
    "model without autograd, do not support this; load the model in a float dtype (UNETLoader "
    "weight_dtype 'default') or use the Exact Inversion nodes, which need no gradients.")
AUTOGRAD_FAILURES = ("does not require grad", "Inference tensors", "derivative for", "version counter")


@contextlib.contextmanager
def differentiable(guider, recompute=True):
    """The guider's models fully loaded (the diffusion model's blocks recomputing their activations in the
    backward pass where `recompute`), their weights lent to autograd; all put back on exit."""
    with loaded_for_backprop(models_of(guider), recompute) as patchers:
        modules = [p.model for p in patchers if isinstance(getattr(p, "model", None), torch.nn.Module)]
        with autograd_weights(modules):
            yield


@contextlib.contextmanager
def failures_explained():
    """Autograd's own errors re-raised as NOT_DIFFERENTIABLE, which says what to do instead."""
    try:
        yield
    except RuntimeError as e:
        if any(s in str(e) for s in AUTOGRAD_FAILURES):
            raise RuntimeError(NOT_DIFFERENTIABLE.format(error=str(e).split("\n")[0])) from e
        raise


def require_input_gradient(model):
    """`model` that refuses to go on when its output is cut off from autograd (a patch running it under
    no_grad, a non-differentiable kernel): the step loss would still have a gradient through the Euler
    step's own x term, so the optimiser would silently run on a wrong one."""
    def checked(x, sigma, **extra_args):
        denoised = model(x, sigma, **extra_args)
        if x.requires_grad and not denoised.requires_grad:
            raise RuntimeError(NOT_DIFFERENTIABLE.format(
                error="its output does not depend on its input through autograd."))
        return denoised
    return checked


def models_of(guider):
    """The ModelPatchers a guider's sampling run uses: the model, then ControlNets and the like."""
    patchers = [getattr(guider, "model_patcher", None), *(getattr(guider, "loaded_models", None) or [])]
    return [p for p in patchers if isinstance(p, comfy.model_patcher.ModelPatcher)]


def _autograd_view(tensor):
    """A normal (non-inference) tensor over the same memory, through DLPack: no copy. Where DLPack cannot
    carry the tensor (a dtype or device it lacks), a copy."""
    try:
        return torch.from_dlpack(tensor.detach())
    except (RuntimeError, BufferError, TypeError):
        return tensor.detach().clone()


@contextlib.contextmanager
def autograd_weights(modules):
    """Lend every inference-tensor parameter and buffer of `modules` to autograd as a normal, frozen
    tensor over the same memory (gradients go to the input only), through the modules' public
    register_parameter / register_buffer; the originals are put back on exit.

    ComfyUI loads weights inside torch.inference_mode(), and autograd refuses to save inference tensors
    for the input gradient; a DLPack view is not one, and costs no memory.
    """
    borrowed, views = [], {}
    with torch.inference_mode(False):
        try:
            for module in modules:
                for sub in module.modules():
                    for kind, store in (("parameter", sub._parameters), ("buffer", sub._buffers)):
                        for name, tensor in list(store.items()):
                            if tensor is None or not tensor.is_inference():
                                continue
                            if kind == "parameter" and not isinstance(tensor, torch.nn.Parameter):
                                continue
                            if id(tensor) not in views:   # tied weights stay tied
                                view = _autograd_view(tensor)
                                views[id(tensor)] = torch.nn.Parameter(view, requires_grad=False) \
                                    if kind == "parameter" else view
                            borrowed.append((sub, kind, name, tensor))
                            _register(sub, kind, name, views[id(tensor)])
            yield
        finally:
            for sub, kind, name, tensor in reversed(borrowed):
                _register(sub, kind, name, tensor)


def _register(module, kind, name, tensor):
    if kind == "parameter":
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=name not in module._non_persistent_buffers_set)


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
        # the caller goes on writing block indices into dict arguments: the recomputation sees this call's
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
