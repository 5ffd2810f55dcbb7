"""Fake (meta) implementations: shapes from ``deep_ep_ops.meta.shapes``, checks from
``deep_ep_ops.validation``; no data is read."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from deep_ep_ops import validation as V
from deep_ep_ops.registry import get as get_buffer
from deep_ep_ops.meta import shapes as S


def _empty(like: torch.Tensor, spec: S.TensorSpec) -> torch.Tensor:
    return like.new_empty(spec.shape, dtype=spec.dtype)


def dispatch_static(x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: torch.Tensor,
                    topk_weights: torch.Tensor, group_name: str, num_experts: int,
                    expert_alignment: int, expand: bool, num_sms: int):
    buf = get_buffer(group_name)
    V.check_dispatch(buf, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
                     num_sms)
    E_loc = num_experts // buf.world_size
    capacity = S.static_capacity(buf.world_size, buf.num_max_tokens_per_rank, buf.num_topk,
                                 E_loc, expert_alignment, expand)
    specs = S.dispatch_specs(x.shape[0], x.shape[1], x.dtype, buf.num_topk,
                             x_scales.shape[1] if x_scales is not None else 0,
                             x_scales.dtype if x_scales is not None else None,
                             topk_weights.dtype, E_loc, expand, capacity,
                             S.buffer_virtual_tokens(buf))
    return tuple(_empty(x, s) for s in specs)


def trim_dispatch(recv_x: torch.Tensor, recv_x_scales: torch.Tensor,
                  recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor,
                  tokens_per_expert: torch.Tensor, handle: torch.Tensor):
    C = recv_x.shape[0]
    # the bound must be a plain int: known when C is (static capacity), else left open
    n = torch.library.get_ctx().new_dynamic_size(min=0, max=C if isinstance(C, int) else None)
    rows = lambda t: t.new_empty((n, *t.shape[1:]))  # noqa: E731
    return (rows(recv_x), rows(recv_x_scales), rows(recv_topk_idx), rows(recv_topk_weights),
            torch.empty_like(tokens_per_expert),
            handle.new_empty((handle.shape[0] - C + n, handle.shape[1])))


def cached_dispatch(x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: torch.Tensor,
                    group_name: str, num_sms: int = 0):
    buf = get_buffer(group_name)
    V.check_cached_dispatch(buf, x, x_scales, handle, num_sms)
    specs = S.cached_dispatch_specs(x.shape, x.dtype,
                                    x_scales.shape if x_scales is not None else None,
                                    x_scales.dtype if x_scales is not None else None,
                                    handle.shape[0], S.buffer_virtual_tokens(buf))
    return tuple(_empty(x, s) for s in specs)


def combine(x: torch.Tensor, handle: torch.Tensor, weights: Optional[torch.Tensor],
            group_name: str, num_sms: int = 0) -> torch.Tensor:
    buf = get_buffer(group_name)
    V.check_combine(buf, x, handle, weights, num_sms)
    return _empty(x, S.combine_spec(x.shape, x.dtype, handle.shape[0],
                                    S.buffer_virtual_tokens(buf)))


def engram_fetch(table: torch.Tensor, indices: torch.Tensor, group_name: str) -> torch.Tensor:
    buf = get_buffer(group_name)
    V.check_engram_fetch(buf, table, indices)
    return _empty(table, S.engram_fetch_spec(indices.shape, table.shape[1], table.dtype))


def engram_scatter_add(grad: torch.Tensor, indices: torch.Tensor, group_name: str,
                       num_entries, hidden) -> torch.Tensor:
    get_buffer(group_name)
    return _empty(grad, S.engram_grad_spec(num_entries, hidden, grad.dtype))


def pp_send_recv(send: torch.Tensor, dst: int, src: int, recv_shape: Sequence,
                 recv_dtype: torch.dtype, group_name: str) -> torch.Tensor:
    buf = get_buffer(group_name)
    V.check_pp(buf, send, dst, src, recv_shape, recv_dtype)
    return _empty(send, S.pp_recv_spec(src, recv_shape, recv_dtype))


def cp_all_gather(x: torch.Tensor, group_name: str) -> torch.Tensor:
    buf = get_buffer(group_name)
    V.check_cp("cp_all_gather", buf, x)
    return _empty(x, S.cp_all_gather_spec(x.shape, x.dtype, buf.world_size))


def cp_reduce_scatter(x: torch.Tensor, group_name: str) -> torch.Tensor:
    buf = get_buffer(group_name)
    V.check_reduce_scatter(buf, x)
    return _empty(x, S.cp_reduce_scatter_spec(x.shape, x.dtype, buf.world_size))


FAKES = {
    "_dispatch_static": dispatch_static,
    "_trim_dispatch": trim_dispatch,
    "cached_dispatch": cached_dispatch,
    "combine": combine,
    "engram_fetch": engram_fetch,
    "_engram_scatter_add": engram_scatter_add,
    "pp_send_recv": pp_send_recv,
    "cp_all_gather": cp_all_gather,
    "cp_reduce_scatter": cp_reduce_scatter,
}
