"""A second device on a CPU-only machine, strict the way CUDA and Apple GPUs are.

Inside `EmulatedDevice()`, tensors put on `DEVICE` (``x.to(DEVICE)``, ``torch.zeros(..., device=DEVICE)``,
``x.new_ones(...)``, ``torch.zeros_like(x)``) become `OnDevice` tensors: they compute with the CPU's
own kernels (so results equal a CPU run bit for bit) but report ``x.device == DEVICE``, and any op
that mixes them with a CPU tensor of one or more dims raises, as CUDA does ("Expected all tensors to
be on the same device"). 0-dim CPU tensors (Python scalars) and CPU index tensors mix, as on CUDA.
With ``float64=False`` the device also refuses float64, as Apple's MPS does.

The emulated device is PyTorch's "meta" device: it exists on every build and allocates nothing;
the mode intercepts every op before a meta kernel could run.
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
MIXING_ALLOWED = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}   # explicit transfers
INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that reports the emulated device."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceMismatch(f"{func}: an emulated-device tensor was used outside EmulatedDevice()")

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    def tolist(self):   # a host copy, as on CUDA (torch refuses tolist on subclasses)
        return self.elem.tolist()


def _is_device(device):
    return device is not None and torch.device(device).type == DEVICE.type


class EmulatedDevice:
    """Run code with `DEVICE` behaving as a strict second device (see the module docstring)."""

    def __init__(self, float64=True):
        self.modes = [_Factories(), _Dispatch(float64)]

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


class _Factories(TorchFunctionMode):
    """torch.tensor / as_tensor / scalar_tensor build their data below the dispatcher, so a device
    kwarg would give a real, empty meta tensor: build on the CPU, then move (which _Dispatch sees)."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.scalar_tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and _is_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, float64=True):
        super().__init__()
        self.float64 = float64

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = []
        tree_map(lambda t: leaves.append(t) if isinstance(t, torch.Tensor) else None, (args, kwargs))
        on_device = any(isinstance(t, OnDevice) for t in leaves)
        if on_device and func not in MIXING_ALLOWED:
            for t in leaves:
                if isinstance(t, OnDevice) or t.dim() == 0:
                    continue
                if func in INDEX_OPS and not t.is_floating_point():
                    continue   # CPU index tensors are accepted by CUDA indexing
                raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two "
                                     f"devices, {DEVICE} (emulated) and {t.device}! ({func}, CPU tensor of shape "
                                     f"{tuple(t.shape)})")
        target = kwargs.get("device")
        to_device = _is_device(target)
        if to_device:
            kwargs["device"] = torch.device("cpu")
        result = func(*tree_map(lambda t: t.elem if isinstance(t, OnDevice) else t, args),
                      **tree_map(lambda t: t.elem if isinstance(t, OnDevice) else t, kwargs))
        wrap = to_device or (on_device and (target is None or func not in MIXING_ALLOWED))
        if func is torch.ops.aten.copy_.default:
            wrap = isinstance(args[0], OnDevice)
        if not wrap:
            return result
        return tree_map(self._wrap, result)

    def _wrap(self, t):
        if not isinstance(t, torch.Tensor) or isinstance(t, OnDevice):
            return t
        if not self.float64 and t.dtype == torch.float64:
            raise DeviceMismatch("this device has no float64 (as Apple GPUs): solve small float64 systems on the CPU")
        return OnDevice(t)


def on_device(t):
    """`t` moved to the emulated device (call inside EmulatedDevice())."""
    return t.to(DEVICE)


def is_on_device(t):
    return isinstance(t, OnDevice)
