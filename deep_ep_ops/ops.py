"""Defines the ``deep_ep`` ops and registers their fake, CPU, CUDA and autograd parts.

Backends: CPU tensors run the reference in ``deep_ep_ops.cpu``; CUDA tensors run
``deep_ep_ops.cuda.backend`` (JIT-built on first use). An op the CUDA backend does not provide
raises NotImplementedError; nothing ever falls back to the CPU path for GPU tensors.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from deep_ep_ops import autograd as _autograd
from deep_ep_ops import validation as V
from deep_ep_ops.buffer import get_buffer
from deep_ep_ops.cpu import engram as cpu_engram
from deep_ep_ops.cpu import moe as cpu_moe
from deep_ep_ops.cpu import pp_cp as cpu_pp_cp
from deep_ep_ops.meta import fake as _fake
from deep_ep_ops.schemas import COMM_OPS, NAMESPACE, SCHEMAS
from deep_ep_ops.trim import trim_dispatch

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema, tags=(torch.Tag.pt2_compliant_tag,))

# Ops whose CUDA kernel (and, for dispatch, CompositeImplicitAutograd kernel) the extension
# registers in C++ (csrc/runtime/torch_ops.cpp: unboxed, no Python on the eager hot path).
# Until the extension is loaded (the first Buffer on an NCCL group) their Python impls serve
# (a CUDA call then raises get_buffer's "no Buffer registered"); they live in a Library of
# their own, destroyed by _use_cpp_kernels() right before the C++ kernels are registered.
CPP_CUDA_OPS = ("_dispatch_static", "cached_dispatch", "combine")
_py_cuda_lib = None


_CUDA_FNS: dict[str, Callable] = {}


def _cuda_backend_fn(name: str) -> Callable:
    fn = _CUDA_FNS.get(name)   # cached: looked up on every eager call
    if fn is None:
        from deep_ep_ops.cuda import backend
        fn = getattr(backend, name, None)
        if fn is None:
            raise NotImplementedError(
                f"deep_ep.{name} has no CUDA implementation yet; use CPU tensors on a gloo "
                "group for the reference backend")
        _CUDA_FNS[name] = fn
    return fn


# -- dispatch / cached_dispatch / combine --------------------------------------------------

def _dispatch(x, x_scales, topk_idx, topk_weights, group_name, num_experts,
              expert_alignment=1, expand=False, exact=False, num_sms=0):
    outputs = torch.ops.deep_ep._dispatch_static(x, x_scales, topk_idx, topk_weights,
                                                 group_name, num_experts, expert_alignment,
                                                 expand, num_sms)
    return torch.ops.deep_ep._trim_dispatch(*outputs) if exact else outputs


def _dispatch_static(x, x_scales, topk_idx, topk_weights, group_name, num_experts,
                     expert_alignment, expand, num_sms):
    buf = get_buffer(group_name)
    V.check_dispatch(buf, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
                     num_sms)
    if x.is_cuda:
        return _cuda_backend_fn("dispatch")(buf, buf.cuda_state, x, x_scales, topk_idx,
                                            topk_weights, num_experts, expert_alignment,
                                            expand, False, num_sms)
    return cpu_moe.dispatch(buf, x, x_scales, topk_idx, topk_weights, num_experts,
                            expert_alignment, expand)


def _cached_dispatch(x, x_scales, handle, group_name, num_sms=0):
    buf = get_buffer(group_name)
    V.check_cached_dispatch(buf, x, x_scales, handle, num_sms)
    if x.is_cuda:
        return _cuda_backend_fn("cached_dispatch")(buf, buf.cuda_state, x, x_scales, handle,
                                                   num_sms)
    return cpu_moe.cached_dispatch(buf, x, x_scales, handle)


def _combine(x, handle, weights, group_name, num_sms=0):
    buf = get_buffer(group_name)
    V.check_combine(buf, x, handle, weights, num_sms)
    if x.is_cuda:
        return _cuda_backend_fn("combine")(buf, buf.cuda_state, x, handle, weights, num_sms)
    return cpu_moe.combine(buf, x, handle, weights)


# -- engram / pp / cp ------------------------------------------------------------------------

def _engram_fetch(table, indices, group_name):
    buf = get_buffer(group_name)
    V.check_engram_fetch(buf, table, indices)
    if table.is_cuda:
        return _cuda_backend_fn("engram_fetch")(buf, buf.cuda_state, table, indices)
    return cpu_engram.engram_fetch(buf, table, indices)


def _engram_scatter_add(grad, indices, group_name, num_entries, hidden):
    buf = get_buffer(group_name)
    if grad.is_cuda:
        return _cuda_backend_fn("engram_scatter_add")(buf, buf.cuda_state, grad, indices,
                                                      num_entries, hidden)
    return cpu_engram.engram_scatter_add(buf, grad, indices, num_entries, hidden)


def _pp_send_recv(send, dst, src, recv_shape, recv_dtype, group_name):
    buf = get_buffer(group_name)
    V.check_pp(buf, send, dst, src, recv_shape, recv_dtype)
    if send.is_cuda:
        return _cuda_backend_fn("pp_send_recv")(buf, buf.cuda_state, send, dst, src,
                                                recv_shape, recv_dtype)
    return cpu_pp_cp.pp_send_recv(buf, send, dst, src, recv_shape, recv_dtype)


def _cp_all_gather(x, group_name):
    buf = get_buffer(group_name)
    V.check_cp("cp_all_gather", buf, x)
    if x.is_cuda:
        return _cuda_backend_fn("cp_all_gather")(buf, buf.cuda_state, x)
    return cpu_pp_cp.cp_all_gather(buf, x)


def _cp_reduce_scatter(x, group_name):
    buf = get_buffer(group_name)
    V.check_reduce_scatter(buf, x)
    if x.is_cuda:
        return _cuda_backend_fn("cp_reduce_scatter")(buf, buf.cuda_state, x)
    return cpu_pp_cp.cp_reduce_scatter(buf, x)


_IMPLS = {
    "_dispatch_static": _dispatch_static,
    "_trim_dispatch": trim_dispatch,
    "cached_dispatch": _cached_dispatch,
    "combine": _combine,
    "engram_fetch": _engram_fetch,
    "_engram_scatter_add": _engram_scatter_add,
    "pp_send_recv": _pp_send_recv,
    "cp_all_gather": _cp_all_gather,
    "cp_reduce_scatter": _cp_reduce_scatter,
}


def _register_py_cuda() -> None:
    """The Python CUDA kernels of CPP_CUDA_OPS and the Python composite dispatch."""
    global _py_cuda_lib
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for name in CPP_CUDA_OPS:
        lib.impl(name, _IMPLS[name], "CUDA")
    lib.impl("dispatch", _dispatch, "CompositeImplicitAutograd")
    _py_cuda_lib = lib


def _use_cpp_kernels(ext) -> None:
    """Swap the Python kernels of CPP_CUDA_OPS (and the composite dispatch) for the C++ ones of
    the loaded extension ``ext`` (once; deep_ep_ops.cuda.backend calls it after loading)."""
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


_KEEP: list = []


def _cuda_slow_path(name, *args):
    """The Python impl of op ``name``, called back by the C++ CUDA kernels when the group has
    no CUDA state registered there (get_buffer raises its message, or the Buffer is a gloo one
    and validation names the device mismatch)."""
    return _IMPLS[name](*args)


def _cuda_value_checks(topk_idx, num_experts) -> None:
    """DEEP_EP_OPS_VALIDATE=1 value checks of dispatch, called back by the C++ CUDA kernel."""
    if V.wants_value_checks(topk_idx):
        V.check_expert_ids(topk_idx, num_experts)


def _register() -> None:
    from torch._library.effects import EffectType
    for name, impl in _IMPLS.items():
        qualname = f"{NAMESPACE}::{name}"
        # One Python entry serves both device keys; it routes by the tensors' device.
        _lib.impl(name, impl, "CPU")
        if name not in CPP_CUDA_OPS:
            _lib.impl(name, impl, "CUDA")
        torch.library.register_fake(qualname, _fake.FAKES[name], lib=_lib)
        if name in COMM_OPS:
            # Other ranks wait for this rank's part of the collective: the compiler must
            # neither drop an op whose outputs are unused nor reorder two of them.
            torch.library._register_effectful_op(qualname, EffectType.ORDERED)
    # dispatch is a composition: autograd, fake tensors and export see its two parts.
    _register_py_cuda()
    _autograd.register_all(_lib)


_register()

dispatch = torch.ops.deep_ep.dispatch
cached_dispatch = torch.ops.deep_ep.cached_dispatch
combine = torch.ops.deep_ep.combine
engram_fetch = torch.ops.deep_ep.engram_fetch
pp_send_recv = torch.ops.deep_ep.pp_send_recv
cp_all_gather = torch.ops.deep_ep.cp_all_gather
cp_reduce_scatter = torch.ops.deep_ep.cp_reduce_scatter
