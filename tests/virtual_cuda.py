"""Virtual CUDA: run code written for ``device="cuda"`` on a machine without a GPU and fail where a real GPU
would fail because tensors of two devices meet.

Inside ``with virtual_cuda():``

- every tensor that the code puts on CUDA (``x.to("cuda")``, ``Module.to("cuda")``, ``torch.zeros(3, device="cuda")``,
  ``torch.tensor(data, device=...)``, ``new_*``/``*_like`` of a CUDA tensor, the result of any op with a CUDA input)
  is a ``VirtualCudaTensor``: ``.device`` is ``cuda:0`` and ``.is_cuda`` is True, while the values live in a plain
  CPU tensor ``.elem`` on which every aten op really runs;
- a ``TorchDispatchMode`` sees every aten op (after the composite ops are decomposed, i.e. the ops that reach a
  device kernel) and, BEFORE running it, applies the device rules of the real CUDA kernels (``_check_devices``):
  a CUDA tensor meeting a CPU tensor raises ``VirtualCudaDeviceError`` (a RuntimeError, as the real one), except
  where eager CUDA PyTorch accepts the mix (each exception cites its ATen source);
- ``.numpy()`` / ``np.asarray`` of a CUDA tensor raise the TypeError of a real CUDA tensor; ``.cpu()``,
  ``.to("cpu")``, ``.tolist()`` and ``.item()`` give plain CPU values, as on a GPU;
- a process forked (``os.fork``, multiprocessing's "fork" context) after the first CUDA tensor was created raises
  CUDA's "Cannot re-initialize CUDA in forked subprocess" at its first CUDA op, as on a GPU;
- ``torch.cuda.is_available()`` is True, ``torch.autocast("cuda", dtype=torch.bfloat16)`` works (autocast's CUDA
  dispatch key is on the virtual tensors, so its CUDA cast policy really applies) and the CUDA calls that need a
  driver (lazy init, synchronize, current_device, ...) are replaced by no-ops; everything is restored on exit.

The checks are exact in the direction that matters for trust: an op that raises here raises on a real GPU (the
rules only reject mixes that ATen rejects). They are lenient in two rare cases, documented in ``_check_devices``:
more than one CPU 0-dim tensor in one kernel, and a CPU 0-dim tensor passed to a kernel that refuses CPU scalars
but is not listed in ``_STRICT_OPS``.

Only FORWARD passes are checked: run the code under ``torch.no_grad()``. With grad mode on, the autograd graph
records CUDA metadata and ``backward()`` fails in the engine itself, which asks the CUDA driver for device 0's
primary context ("hasPrimaryContext expects a valid device index"); optimizer steps and ``autograd.grad`` are
therefore not covered.

Other limits: random ops on virtual CUDA tensors draw from the CPU generator (values differ from a GPU run;
devices do not); ``torch.Generator(device="cuda")``, the CUDA RNG-state functions, pinned memory and streams need a
real GPU; ``torch.cuda.is_initialized()`` stays False; cuDNN is switched off inside the block (composite ops then
pick the native kernels, whose device rules are the same). ``torch._C._ensureCUDADeviceGuardSet()`` (a no-op CUDA
device guard where no driver is present, as FakeTensorMode installs) cannot be undone; it changes nothing for
code that does not create CUDA tensors.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["VirtualCudaTensor", "VirtualCudaDeviceError", "virtual_cuda", "is_virtual_cuda"]

CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten
_STATS = {"ops": 0, "cuda_ops": 0}  # aten ops seen / ops that had a CUDA tensor (checked), while the harness is on
# CUDA is initialised by the first CUDA tensor and a process forked after that cannot use CUDA (torch/cuda/__init__.py
# _lazy_init: "Cannot re-initialize CUDA in forked subprocess"; ops on inherited CUDA tensors fail in the driver).
_FORK = {"initialized": False, "bad_fork": False}
BAD_FORK_MESSAGE = ("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use "
                    "the 'spawn' start method")


def _after_fork_in_child() -> None:
    _FORK["bad_fork"] = _FORK["initialized"]


os.register_at_fork(after_in_child=_after_fork_in_child)


class VirtualCudaDeviceError(RuntimeError):
    """Raised where a real GPU would raise a device-mismatch RuntimeError."""


class VirtualCudaTensor(torch.Tensor):
    """A tensor that reports ``device=cuda:0`` and holds its values in the CPU tensor ``elem`` (same sizes, strides,
    storage offset and dtype). It has no storage of its own: every op goes through ``_dispatch``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "VirtualCudaTensor":
        if type(elem) is not torch.Tensor or elem.device.type != "cpu":
            raise TypeError(f"VirtualCudaTensor wraps a plain CPU tensor, got {type(elem).__name__} on {elem.device}")
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=CUDA0, requires_grad=False)
        r.elem = elem
        _FORK["initialized"] = True
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"VirtualCudaTensor({self.elem!r}, device='cuda:0')"

    def numpy(self, *, force: bool = False):
        if not force:  # the message of Tensor.numpy() on a real CUDA tensor
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        return self.elem.detach().numpy()

    def tolist(self):  # a CUDA tensor's tolist() copies to the host
        return self.elem.tolist()


def is_virtual_cuda(t: Any) -> bool:
    return isinstance(t, VirtualCudaTensor)


# ------------------------------------------------------------------------------------------------ device rules
# Ops that accept tensors of any device combination (they copy across devices): copy_/copy/_copy_from* (the
# cross-device copy itself), _to_copy (Tensor.to), the *_scatter ops (clone + copy_ of ``src`` into a view,
# aten/src/ATen/native/TensorShape.cpp), lift_fresh (torch.tensor). Same list as torch/_subclasses/fake_impls.py
# ``multi_device_op_default``.
_FREE_OPS = {aten.copy_, aten.copy, aten._copy_from, aten._copy_from_and_resize, aten._to_copy, aten.slice_scatter,
             aten.select_scatter, aten.diagonal_scatter, aten.as_strided_scatter, aten.lift_fresh,
             aten.lift_fresh_copy, aten._foreach_copy_}
# Indexing with a CPU index tensor is allowed for a CUDA ``self``: aten/src/ATen/native/TensorAdvancedIndexing.cpp,
# TORCH_PRECOMPUTE_META_FUNC2(index, Tensor) -> check_indices_on_cpu_or_selfdevice ("Only allow:
# `dev_tensor[{cpu,dev}_tensor]`", PR #69607). A CUDA index of a CPU ``self`` is an error there.
_INDEX_OPS = {aten.index, aten._unsafe_index}
# index_put_: _index_put_impl_ moves the indices to self's device (make_info / makeLinearIndex) and a 0-dim
# one-element ``values`` too ("value.device() != self.device() && value.numel() == 1 && value.dim() == 0");
# other ``values`` go through a TensorIterator with ``self`` and must be on its device.
_INDEX_PUT_OPS = {aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put}
# fill_(self, Tensor value) reads a value of another device with value.item() (aten/src/ATen/native/Fill.cpp);
# masked_fill_ also reads its 0-dim ``value`` with item(), but its CUDA kernel requires ``mask`` on self's device.
_VALUE_ITEM_OPS = {aten.fill, aten.fill_, aten.masked_fill, aten.masked_fill_}
# Kernels where a CPU 0-dim tensor beside CUDA ones is an error: TensorIterators built without allow_cpu_scalars
# (clamp.Tensor: CLAMP_CONFIG in aten/src/ATen/native/TensorCompare.cpp; addcmul/addcdiv: build_ternary_op in
# aten/src/ATen/TensorIterator.cpp), nextafter (torch/_subclasses/fake_tensor.py
# ``bypass_zero_dim_cpu_tensor_check_ops``), the CUDA cat kernel (cat/stack) and kernels with their own
# same-device checks (indexing, embedding, convolution, matrix products; masked_fill's mask, see above).
_STRICT_OPS = {aten.clamp, aten.clamp_, aten.addcmul, aten.addcmul_, aten.addcdiv, aten.addcdiv_, aten.nextafter,
               aten.cat, aten.stack, aten.index_select, aten.gather, aten.scatter, aten.scatter_, aten.scatter_add,
               aten.scatter_add_, aten.embedding, aten.convolution, aten.mm, aten.bmm, aten.addmm, aten.take}


def _leaves(x, out: list) -> list:
    """The tensors in ``x`` (nested lists / tuples / dicts), in order."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _leaves(v, out)
    return out


def _map(fn, x):
    """``x`` with every tensor replaced by ``fn(tensor)`` (nested lists / tuples / dicts)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, list):
        return [_map(fn, v) for v in x]
    if isinstance(x, tuple):
        mapped = [_map(fn, v) for v in x]
        return tuple(mapped) if type(x) is tuple else type(x)(mapped)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return x


_SCHEMAS: dict = {}


def _schema(func) -> tuple[list[str], frozenset[str]]:
    """(argument names in order, names of the arguments the op writes to) of an op overload, cached."""
    if func not in _SCHEMAS:
        arguments = func._schema.arguments
        _SCHEMAS[func] = ([a.name for a in arguments],
                          frozenset(a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write))
    return _SCHEMAS[func]


def _named_tensors(func, args, kwargs) -> list[tuple[str, torch.Tensor, bool]]:
    """(argument name, tensor, written to) for every tensor argument (lists of tensors flattened)."""
    names, written = _schema(func)
    out = []
    for name, value in [*zip(names, args), *kwargs.items()]:
        for t in _leaves(value, []):
            out.append((name, t, name in written))
    return out


def _mismatch(func, d0: torch.device, d1: torch.device, detail: str = "") -> VirtualCudaDeviceError:
    return VirtualCudaDeviceError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                  f"{d0} and {d1}! (virtual CUDA: {func}{detail})")


def _check_devices(func, args, kwargs) -> None:
    """Raise where the real CUDA kernel of ``func`` raises for the devices of its tensor arguments.

    Default (TensorIterator, aten/src/ATen/TensorIterator.cpp ``compute_types``): the common device is the first
    non-CPU device among the operands; every operand must be on it, except a CPU 0-dim tensor that is an INPUT
    (not written to; ``allow_cpu_scalars``). ATen allows at most one such CPU scalar per kernel, and only in
    TensorIterator kernels built with allow_cpu_scalars (binary and comparison ops, where, lerp, ...); this check
    does not count them and allows them in every op not in ``_STRICT_OPS`` (lenient, never stricter than ATen)."""
    packet = func.overloadpacket
    if packet in _FREE_OPS:
        return
    named = _named_tensors(func, args, kwargs)
    if not named:
        return
    if packet in _INDEX_OPS or packet in _INDEX_PUT_OPS:
        self_t = next(t for n, t, _ in named if n == "self")
        for n, t, _ in named:
            if n == "indices" and packet in _INDEX_OPS and t.device not in (CPU, self_t.device):
                raise VirtualCudaDeviceError(f"indices should be either on cpu or on the same device as the indexed "
                                             f"tensor ({self_t.device}) (virtual CUDA: {func})")
            if n == "values" and t.device != self_t.device and not (t.dim() == 0 and t.numel() == 1):
                raise _mismatch(func, self_t.device, t.device, ": values")
        return
    if packet in _VALUE_ITEM_OPS:
        named = [(n, t, m) for n, t, m in named if n != "value"]
    strict = packet in _STRICT_OPS or packet in _VALUE_ITEM_OPS  # masked_fill's mask: same device as self
    common = next((t.device for _, t, _ in named if t.device.type != "cpu"), CPU)
    for n, t, mutated in named:
        if t.device == common:
            continue
        if t.device.type == "cpu" and t.dim() == 0 and not mutated and not strict:
            continue
        raise _mismatch(func, common, t.device, f": argument {n!r}{' (written to)' if mutated else ''}")


# ------------------------------------------------------------------------------------------------ dispatch
def _device_arg(value) -> torch.device | None:
    if isinstance(value, (torch.device, str)):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    return None


def _same_elements(w: torch.Tensor, elem: torch.Tensor) -> bool:
    """Whether the wrapper's metadata still addresses the elements of ``elem``: the wrapper's sizes / strides are
    fixed at creation, so an in-place metadata op (``as_strided_``, ``resize_``, ``unsqueeze_``, ...) must not
    change them. Strides of size-1 dimensions address nothing (e.g. ``adaptive_avg_pool2d`` to 1x1 restrides its
    NCHW output to channels_last with ``as_strided_``: same elements, same device)."""
    if w.shape != elem.shape or w.storage_offset() != elem.storage_offset():
        return False
    return all(n == 1 or a == b for n, a, b in zip(elem.shape, w.stride(), elem.stride()))


def _dispatch(func, args, kwargs):
    """Run ``func`` on the CPU values; the result is virtual CUDA when an input was, or when it was created on
    CUDA (``device=`` kwarg); ``device="cpu"`` gives plain CPU tensors."""
    _STATS["ops"] += 1
    target = None
    dev = _device_arg(kwargs.get("device"))
    if dev is not None and dev.type == "cuda":
        if dev.index not in (None, 0):
            raise RuntimeError(f"CUDA error: invalid device ordinal (virtual CUDA has one device, got {dev})")
        kwargs = {**kwargs, "device": CPU}
        target = "cuda"
    elif dev is not None and dev.type == "cpu":
        target = "cpu"
    tensors = _leaves((args, kwargs), [])
    wrappers = [t for t in tensors if isinstance(t, VirtualCudaTensor)]
    if not wrappers and target != "cuda":  # a CPU op: nothing to check, nothing to wrap
        return func(*args, **kwargs)
    if _FORK["bad_fork"]:
        raise RuntimeError(f"{BAD_FORK_MESSAGE} (virtual CUDA: {func} in a process forked after CUDA was used)")
    _STATS["cuda_ops"] += 1
    gen = kwargs.get("generator")
    if gen is not None and gen.device.type == "cpu":
        raise VirtualCudaDeviceError(f"Expected a 'cuda' device type for generator but found 'cpu' "
                                     f"(virtual CUDA: {func})")
    _check_devices(func, args, kwargs)
    if target is None:
        target = "cuda"
    cpu_args, cpu_kwargs = _map(lambda t: t.elem if isinstance(t, VirtualCudaTensor) else t, (args, kwargs))
    out = func(*cpu_args, **cpu_kwargs)
    for w in wrappers:
        if not _same_elements(w, w.elem):
            raise NotImplementedError(f"virtual CUDA: {func} changed the shape / layout of a CUDA tensor in place "
                                      f"({tuple(w.shape)}, {w.stride()} -> {tuple(w.elem.shape)}, {w.elem.stride()}); "
                                      "the harness cannot update a wrapper's metadata")
    originals = {id(t): t for t in tensors}
    originals.update((id(w.elem), w) for w in wrappers)

    def wrap(t):
        if id(t) in originals:  # in-place / out= ops return their argument itself
            return originals[id(t)]
        return VirtualCudaTensor(t) if target == "cuda" else t

    return _map(wrap, out)


class _VirtualCudaMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _cuda_patches() -> dict[str, Any]:
    """torch.cuda functions that would touch the driver, replaced while the harness is active."""
    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "_lazy_init": lambda: None,
        "synchronize": lambda device=None: None,
        "is_bf16_supported": lambda including_emulation=True: True,
        "get_device_name": lambda device=None: "virtual CUDA (CPU)",
    }


_ACTIVE = []


@contextlib.contextmanager
def virtual_cuda() -> Iterator[dict[str, int]]:
    """Within the block, ``device="cuda"`` works on a CPU-only machine and device mixes raise as on a GPU.

    Yields the op counters ``{"ops": aten ops seen, "cuda_ops": ops with a CUDA tensor, i.e. device-checked}``,
    so a test can show that its code really ran on (virtual) CUDA.

    Modules must be moved to "cuda" inside the block: ``Module.to`` then swaps each parameter with its virtual
    CUDA copy in place (``torch.__future__.set_swap_module_params_on_conversion``), so parameter objects keep
    their identity as with a real ``.to("cuda")``. The swap refuses a parameter that something else still holds
    (an autograd graph, an optimizer state): move modules before running them."""
    if _ACTIVE:
        raise RuntimeError("virtual_cuda() is already active")
    saved_cuda = {name: getattr(torch.cuda, name) for name in _cuda_patches()}
    saved_swap = torch.__future__.get_swap_module_params_on_conversion()
    saved_lift = torch._C._only_lift_cpu_tensors()
    _STATS.update(ops=0, cuda_ops=0)
    _FORK.update(initialized=False, bad_fork=False)  # each block simulates a fresh process
    _ACTIVE.append(True)
    try:
        for name, fn in _cuda_patches().items():
            setattr(torch.cuda, name, fn)
        torch.__future__.set_swap_module_params_on_conversion(True)
        # torch.tensor(data, device="cuda"): build on CPU, then lift_fresh + _to_copy through the mode (what
        # FakeTensorMode does); the CUDA device guard becomes a no-op when no driver is present (idem).
        torch._C._set_only_lift_cpu_tensors(True)
        torch._C._ensureCUDADeviceGuardSet()
        # composite ops pick cuDNN kernels (cudnn_batch_norm, ...) for CUDA inputs; they have no CPU kernel, so
        # they are routed to the native kernels, which have the same device rules
        with torch.backends.cudnn.flags(enabled=False), _VirtualCudaMode():
            yield _STATS
    finally:
        _ACTIVE.clear()
        _FORK.update(initialized=False, bad_fork=False)
        for name, fn in saved_cuda.items():
            setattr(torch.cuda, name, fn)
        torch.__future__.set_swap_module_params_on_conversion(saved_swap)
        torch._C._set_only_lift_cpu_tensors(saved_lift)
