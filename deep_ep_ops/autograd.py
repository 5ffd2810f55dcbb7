"""Backward formulas. Each calls only ``torch.ops.deep_ep.*`` and torch ops, so backward
graphs compile, export and capture like the forward ones.

The ops with a C++ autograd kernel (``_dispatch_static``, ``cached_dispatch``, ``combine``) take
their formulas from the table deep_ep_ops/autograd_formulas.py, rendered as Python
(codegen/py_autograd.py, compiled here at import) and as C++ (generated/ep_autograd_formulas.hpp,
codegen/ep_autograd.py). The others are written here only: their CUDA kernels
are Python glue (cuda/channels.py, trim.py), so a C++ autograd kernel would keep no Python off
their eager path.
"""
from __future__ import annotations

import torch

from deep_ep_ops.autograd_formulas import FORMULAS
from deep_ep_ops.codegen.py_autograd import compile_formula

_ops = torch.ops.deep_ep


# ---- the ops without a C++ autograd kernel -------------------------------------------------

# _trim_dispatch: the dropped rows got no gradient; pad back to the static capacity.
def _trim_setup(ctx, inputs, output):
    ctx.capacity = inputs[0].shape[0]


def _trim_backward(ctx, g_x, g_scales, g_idx, g_w, g_tpe, g_handle):
    def pad(g):
        if g is None:
            return None
        return torch.cat([g, g.new_zeros((ctx.capacity - g.shape[0], *g.shape[1:]))])
    return pad(g_x), None, None, pad(g_w), None, None


# engram_fetch: the owners' shards receive the scatter-add of every rank's row gradients.
def _engram_setup(ctx, inputs, output):
    table, indices, group_name = inputs
    ctx.save_for_backward(indices)
    ctx.group_name, ctx.table_shape = group_name, table.shape


def _engram_backward(ctx, g_out):
    (indices,) = ctx.saved_tensors
    grad = _ops._engram_scatter_add(g_out.contiguous(), indices, ctx.group_name,
                                    ctx.table_shape[0], ctx.table_shape[1])
    return grad, None, None


# pp_send_recv: gradients flow back along the reversed edge.
def _pp_setup(ctx, inputs, output):
    send, dst, src, _, _, group_name = inputs
    ctx.dst, ctx.src, ctx.group_name = dst, src, group_name
    ctx.send_shape, ctx.send_dtype = send.shape, send.dtype


def _pp_backward(ctx, g_recv):
    send_back = g_recv.contiguous() if ctx.src >= 0 else g_recv.new_empty((0,))
    grad = _ops.pp_send_recv(send_back, ctx.src, ctx.dst,
                             list(ctx.send_shape) if ctx.dst >= 0 else [0],
                             ctx.send_dtype, ctx.group_name)
    return (grad if ctx.dst >= 0 else None), None, None, None, None, None


# cp_all_gather and cp_reduce_scatter are each other's backward.
def _cp_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _all_gather_backward(ctx, g):
    return _ops.cp_reduce_scatter(g.contiguous(), ctx.group_name), None


def _reduce_scatter_backward(ctx, g):
    return _ops.cp_all_gather(g.contiguous(), ctx.group_name), None


_FORMULAS = {
    **{f.op: compile_formula(f) for f in FORMULAS},
    "_trim_dispatch": (_trim_backward, _trim_setup),
    "engram_fetch": (_engram_backward, _engram_setup),
    "pp_send_recv": (_pp_backward, _pp_setup),
    "cp_all_gather": (_all_gather_backward, _cp_setup),
    "cp_reduce_scatter": (_reduce_scatter_backward, _cp_setup),
}


def register_all(lib: torch.library.Library) -> None:
    for name, (backward, setup) in _FORMULAS.items():
        torch.library.register_autograd(f"{lib.ns}::{name}", backward, setup_context=setup,
                                        lib=lib)
