"""Backward formulas. Each calls only ``torch.ops.deep_ep.*`` and torch ops, so backward
graphs compile, export and capture like the forward ones."""
from __future__ import annotations

import torch

from deep_ep_ops import handle as H

_ops = torch.ops.deep_ep


def _receive_part(handle: torch.Tensor, num_rows) -> torch.Tensor:
    """The receive part: the handle's last C rows on one host and on several (where the
    virtual part sits between the send and the receive parts)."""
    return handle[handle.shape[0] - num_rows:]


# dispatch: d x = combine(d recv_x) (sums the copies); d topk_weights[t, k] = the gradient of
# the recv_topk_weights entry that carried slot k (exactly one rank holds each (t, k), so a
# combine of the slot-placed gradients returns it).
def _dispatch_setup(ctx, inputs, output):
    x, _, _, topk_weights, group_name, _, _, expand, num_sms = inputs
    handle, recv_idx = output[5], output[2]
    ctx.save_for_backward(handle, recv_idx)
    ctx.group_name, ctx.expand, ctx.num_sms = group_name, expand, num_sms
    ctx.num_topk = topk_weights.shape[1]


def _dispatch_backward(ctx, g_x, g_scales, g_idx, g_w, g_tpe, g_handle):
    handle, recv_idx = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0] and g_x is not None:
        grad_x = _ops.combine(g_x.contiguous(), handle, None, ctx.group_name, ctx.num_sms)
    if ctx.needs_input_grad[3] and g_w is not None:
        if ctx.expand:
            slot = _receive_part(handle, g_w.shape[0])[:, H.RECV_TOPK_SLOT].long()
            valid = slot >= 0
            rows = g_w.new_zeros((g_w.shape[0], ctx.num_topk))
            rows = rows.scatter(1, slot.clamp(min=0)[:, None],
                                torch.where(valid, g_w, torch.zeros_like(g_w))[:, None])
        else:
            rows = torch.where(recv_idx >= 0, g_w, torch.zeros_like(g_w))
        grad_w = _ops.combine(rows.contiguous(), handle, None, ctx.group_name, ctx.num_sms)
    return grad_x, None, None, grad_w, None, None, None, None, None


# _trim_dispatch: the dropped rows got no gradient; pad back to the static capacity.
def _trim_setup(ctx, inputs, output):
    ctx.capacity = inputs[0].shape[0]


def _trim_backward(ctx, g_x, g_scales, g_idx, g_w, g_tpe, g_handle):
    def pad(g):
        if g is None:
            return None
        return torch.cat([g, g.new_zeros((ctx.capacity - g.shape[0], *g.shape[1:]))])
    return pad(g_x), None, None, pad(g_w), None, None


# cached_dispatch: d x = combine(d recv_x).
def _cached_dispatch_setup(ctx, inputs, output):
    _, _, handle, group_name, num_sms = inputs
    ctx.save_for_backward(handle)
    ctx.group_name, ctx.num_sms = group_name, num_sms


def _cached_dispatch_backward(ctx, g_x, g_scales):
    (handle,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0] and g_x is not None:
        grad_x = _ops.combine(g_x.contiguous(), handle, None, ctx.group_name, ctx.num_sms)
    return grad_x, None, None, None, None


# combine: d x[row] = w[row] * d out[t(row)] (a cached dispatch of d out);
# d w[row] = <d out[t(row)], x[row]>.
def _combine_setup(ctx, inputs, output):
    x, handle, weights, group_name, num_sms = inputs
    ctx.save_for_backward(x, handle, weights)
    ctx.group_name, ctx.num_sms = group_name, num_sms


def _combine_backward(ctx, g_out):
    x, handle, weights = ctx.saved_tensors
    rows, _ = _ops.cached_dispatch(g_out.contiguous(), None, handle, ctx.group_name,
                                   ctx.num_sms)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = rows if weights is None else \
            (rows.to(acc) * weights.to(acc)[:, None]).to(x.dtype)
    if weights is not None and ctx.needs_input_grad[2]:
        grad_w = (rows.to(acc) * x.to(acc)).sum(-1).to(weights.dtype)
    return grad_x, None, grad_w, None, None


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
    "_dispatch_static": (_dispatch_backward, _dispatch_setup),
    "_trim_dispatch": (_trim_backward, _trim_setup),
    "cached_dispatch": (_cached_dispatch_backward, _cached_dispatch_setup),
    "combine": (_combine_backward, _combine_setup),
    "engram_fetch": (_engram_backward, _engram_setup),
    "pp_send_recv": (_pp_backward, _pp_setup),
    "cp_all_gather": (_all_gather_backward, _cp_setup),
    "cp_reduce_scatter": (_reduce_scatter_backward, _cp_setup),
}


def register_all(lib: torch.library.Library) -> None:
    for name, (backward, setup) in _FORMULAS.items():
        torch.library.register_autograd(f"{lib.ns}::{name}", backward, setup_context=setup,
                                        lib=lib)
