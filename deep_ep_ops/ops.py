"""Defines the ``deep_ep`` ops and registers their fake, CPU, CUDA and autograd parts.

Every op is one row of ``_OPS``: its input check (deep_ep_ops.validation), its CPU reference
(deep_ep_ops.cpu) and its CUDA glue (deep_ep_ops.cuda). A call finds its Buffer in the registry,
checks its inputs and runs the backend of its tensors' device; an op the CUDA backend lacks
raises NotImplementedError; nothing falls back to the CPU path for GPU tensors.

The CUDA kernels of ``_dispatch_static``, ``cached_dispatch`` and ``combine`` and the composite
``dispatch`` also exist in C++ (csrc/torch/): once the extension is loaded (the first CUDA
Buffer), ``_use_cpp_kernels`` swaps them in, so the eager hot path runs no Python.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from deep_ep_ops import autograd as _autograd
from deep_ep_ops import registry
from deep_ep_ops import validation as V
from deep_ep_ops.cpu import engram as cpu_engram
from deep_ep_ops.cpu import interhost as cpu_interhost
from deep_ep_ops.cpu import multihost as cpu_ep
from deep_ep_ops.cpu import pp_cp as cpu_pp_cp
from deep_ep_ops.cuda import channels as cuda_channels
from deep_ep_ops.cuda import ep as cuda_ep
from deep_ep_ops.cuda import extension
from deep_ep_ops.cuda import multihost as cuda_multihost
from deep_ep_ops.meta import fake as _fake
from deep_ep_ops.schemas import COMM_OPS, MULTIHOST_SCHEMAS, NAMESPACE, SCHEMAS
from deep_ep_ops.trim import trim_dispatch

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))
for _schema in MULTIHOST_SCHEMAS.values():
    _lib.define(_schema)


@dataclass(frozen=True)
class OpImpl:
    """How one collective op runs: ``check(buf, *args)``, then ``cpu(buf, *args)`` or
    ``cuda(buf, *args)`` by the device of its first tensor argument (``args`` are the op's
    arguments without group_name)."""
    check: Optional[Callable]
    cpu: Callable
    cuda: Optional[Callable]


def _requested_wire() -> str:
    """The inter-host wire the composite dispatch asked for: the Python composite's context
    (``_dispatch``), or the C++ composite's (which serves CPU tensors too once the extension is
    loaded)."""
    ext = extension.loaded()
    if ext is not None and ext.exact_wire_requested():
        return "exact"
    return cpu_interhost.current_wire()


def _cpu_dispatch(buf, x, s, idx, w, E, A, expand):
    with cpu_interhost.wire(_requested_wire()):
        return cpu_ep.dispatch(buf, x, s, idx, w, E, A, expand)


# The CPU reference takes no num_sms (it launches nothing).
_OPS: dict[str, OpImpl] = {
    "_dispatch_static": OpImpl(
        lambda buf, x, s, idx, w, E, A, expand, num_sms:
            V.check_dispatch(buf, x, s, idx, w, E, A, num_sms),
        lambda buf, x, s, idx, w, E, A, expand, num_sms:
            _cpu_dispatch(buf, x, s, idx, w, E, A, expand),
        cuda_ep.dispatch),
    "cached_dispatch": OpImpl(
        V.check_cached_dispatch,
        lambda buf, x, s, handle, num_sms: cpu_ep.cached_dispatch(buf, x, s, handle),
        cuda_ep.cached_dispatch),
    "combine": OpImpl(
        V.check_combine,
        lambda buf, x, handle, w, num_sms: cpu_ep.combine(buf, x, handle, w),
        cuda_ep.combine),
    "engram_fetch": OpImpl(V.check_engram_fetch, cpu_engram.engram_fetch,
                           cuda_channels.engram_fetch),
    "_engram_scatter_add": OpImpl(None, cpu_engram.engram_scatter_add,
                                  cuda_channels.engram_scatter_add),
    "pp_send_recv": OpImpl(V.check_pp, cpu_pp_cp.pp_send_recv, cuda_channels.pp_send_recv),
    "cp_all_gather": OpImpl(lambda buf, x: V.check_cp("cp_all_gather", buf, x),
                            cpu_pp_cp.cp_all_gather, cuda_channels.cp_all_gather),
    "cp_reduce_scatter": OpImpl(V.check_reduce_scatter, cpu_pp_cp.cp_reduce_scatter,
                                cuda_channels.cp_reduce_scatter),
}


def _entry(name: str) -> Callable:
    """The Python kernel of op ``name``: registry lookup, check, backend by device (the row of
    ``_OPS`` is read at call time, so a test may swap it)."""
    schema_args = torch._C.parse_schema(SCHEMAS[name]).arguments
    group_at = next(i for i, a in enumerate(schema_args) if a.name == "group_name")
    defaults = [a.default_value for a in schema_args]

    def run(*args):
        if len(args) < len(defaults):  # the dispatcher leaves trailing defaults out
            args = args + tuple(defaults[len(args):])
        impl = _OPS[name]
        group_name = args[group_at]
        rest = args[:group_at] + args[group_at + 1:]
        buf = registry.get(group_name)
        if impl.check is not None:
            impl.check(buf, *rest)
        if rest[0].is_cuda:
            if impl.cuda is None:
                raise NotImplementedError(
                    f"deep_ep.{name} has no CUDA implementation yet; use CPU tensors on a gloo "
                    "group for the reference backend")
            return impl.cuda(buf, *rest)
        return impl.cpu(buf, *rest)
    run.__name__ = f"{name}_impl"
    return run


def _dispatch(x, x_scales, topk_idx, topk_weights, group_name, num_experts,
              expert_alignment=1, expand=False, exact=False, num_sms=0):
    """The composite dispatch: the static-capacity collective, then a local trim when exact
    (only the collective carries an effect token; see schemas.py). On several hosts the CPU
    reference's collective sends only real rows between hosts when exact (counts first), a
    fixed M rows per rail pair otherwise (deep_ep_ops.cpu.interhost); the outputs are the same."""
    with cpu_interhost.wire("exact" if exact else "static"):
        outputs = torch.ops.deep_ep._dispatch_static(x, x_scales, topk_idx, topk_weights,
                                                     group_name, num_experts,
                                                     expert_alignment, expand, num_sms)
    return torch.ops.deep_ep._trim_dispatch(*outputs) if exact else outputs


def _trim_dispatch_cuda(*outputs):
    """trim_dispatch on CUDA tensors; the trimmed handle inherits the record of the static one
    (the C++ kernels check handles against these records without a sync)."""
    trimmed = trim_dispatch(*outputs)
    cuda_ep.record_trimmed_handle(outputs[5], trimmed[5])
    cuda_multihost.record_trimmed_handle(outputs[5], trimmed[5])
    return trimmed


# The CUDA kernels of a Buffer spanning hosts (schemas.py MULTIHOST_SCHEMAS): the C++ kernels
# of the public ops call them through the dispatcher and skip their own checks for such a
# Buffer, so the Python checks run here.
def _multihost_dispatch_static(x, x_scales, topk_idx, topk_weights, group_name, num_experts,
                               expert_alignment, expand, num_sms, exact_wire):
    buf = registry.get(group_name)
    V.check_dispatch(buf, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
                     num_sms)
    return cuda_multihost.dispatch_static(buf, x, x_scales, topk_idx, topk_weights,
                                          num_experts, expert_alignment, expand, num_sms,
                                          exact_wire)


def _multihost_cached_dispatch(x, x_scales, handle, group_name, num_sms):
    buf = registry.get(group_name)
    V.check_cached_dispatch(buf, x, x_scales, handle, num_sms,
                            cuda_multihost.recorded_header(handle))
    return cuda_multihost.cached_dispatch(buf, x, x_scales, handle, num_sms)


def _multihost_combine(x, handle, weights, group_name, num_sms):
    buf = registry.get(group_name)
    V.check_combine(buf, x, handle, weights, num_sms, cuda_multihost.recorded_header(handle))
    return cuda_multihost.combine(buf, x, handle, weights, num_sms)


_MULTIHOST_KERNELS: dict[str, tuple[Callable, Callable]] = {  # name -> (CUDA kernel, fake)
    "_multihost_dispatch_static": (_multihost_dispatch_static,
                                   lambda *args: _fake.dispatch_static(*args[:-1])),
    "_multihost_cached_dispatch": (_multihost_cached_dispatch, _fake.cached_dispatch),
    "_multihost_combine": (_multihost_combine, _fake.combine),
}


_KERNELS: dict[str, Callable] = {name: _entry(name) for name in _OPS}
_KERNELS["_trim_dispatch"] = trim_dispatch
# CUDA kernels other than the entry of _KERNELS
_CUDA_KERNELS: dict[str, Callable] = {"_trim_dispatch": _trim_dispatch_cuda}

# Ops whose CUDA kernel (and, for dispatch, CompositeImplicitAutograd kernel) the extension
# registers in C++ once loaded. Until then their Python kernels serve (a CUDA call then raises
# the registry's "no Buffer registered" or validation's device message); they live in a
# Library of their own, destroyed right before the C++ kernels are registered.
CPP_CUDA_OPS = ("_dispatch_static", "cached_dispatch", "combine")
_py_cuda_lib: Optional[torch.library.Library] = None
_KEEP: list = []


def _register_py_cuda() -> None:
    global _py_cuda_lib
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for name in CPP_CUDA_OPS:
        lib.impl(name, _KERNELS[name], "CUDA")
    lib.impl("dispatch", _dispatch, "CompositeImplicitAutograd")
    _py_cuda_lib = lib


def _use_cpp_kernels(ext) -> None:
    """Swap the Python kernels of CPP_CUDA_OPS (and the composite dispatch) for the C++ ones of
    the just loaded extension ``ext`` (an extension.on_load hook)."""
    global _py_cuda_lib
    if _py_cuda_lib is None:
        return
    if tuple(ext.cpp_cuda_ops()) != CPP_CUDA_OPS:
        raise RuntimeError(f"deep_ep_ops: the extension registers {ext.cpp_cuda_ops()}, "
                           f"ops.py expects {CPP_CUDA_OPS}")
    composite = os.environ.get("DEEP_EP_OPS_PY_COMPOSITE", "0") != "1"
    _py_cuda_lib._destroy()
    _py_cuda_lib = None
    try:
        ext.register_kernels(composite)
    except BaseException:
        _register_py_cuda()
        raise
    # C++ autograd kernels of the same ops for CUDA tensors (the Python ones of autograd.py
    # stay on the Autograd alias key: CPU tensors, and CUDA with DEEP_EP_OPS_CPP_AUTOGRAD=0).
    if os.environ.get("DEEP_EP_OPS_CPP_AUTOGRAD", "1") != "0":
        ext.register_autograd_kernels()
    if not composite:  # keep the Python composite dispatch (debug switch)
        lib = torch.library.Library(NAMESPACE, "IMPL")
        lib.impl("dispatch", _dispatch, "CompositeImplicitAutograd")
        _KEEP.append(lib)


def _register() -> None:
    from torch._library.effects import EffectType
    for name, kernel in _KERNELS.items():
        qualname = f"{NAMESPACE}::{name}"
        # One Python entry serves both device keys; it routes by the tensors' device.
        _lib.impl(name, kernel, "CPU")
        if name not in CPP_CUDA_OPS:
            _lib.impl(name, _CUDA_KERNELS.get(name, kernel), "CUDA")
        torch.library.register_fake(qualname, _fake.FAKES[name], lib=_lib)
        if name in COMM_OPS:
            # Other ranks wait for this rank's part of the collective: the compiler must
            # neither drop an op whose outputs are unused nor reorder two of them.
            torch.library._register_effectful_op(qualname, EffectType.ORDERED)
    for name, (kernel, fake) in _MULTIHOST_KERNELS.items():
        _lib.impl(name, kernel, "CUDA")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_lib)
    # dispatch is a composition: autograd, fake tensors and export see its two parts.
    _register_py_cuda()
    _autograd.register_all(_lib)
    extension.on_load(_use_cpp_kernels)


_register()

dispatch = torch.ops.deep_ep.dispatch
cached_dispatch = torch.ops.deep_ep.cached_dispatch
combine = torch.ops.deep_ep.combine
engram_fetch = torch.ops.deep_ep.engram_fetch
pp_send_recv = torch.ops.deep_ep.pp_send_recv
cp_all_gather = torch.ops.deep_ep.cp_all_gather
cp_reduce_scatter = torch.ops.deep_ep.cp_reduce_scatter
