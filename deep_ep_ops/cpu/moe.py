"""Reference dispatch, cached_dispatch and combine (gloo, CPU tensors)."""
from __future__ import annotations

from typing import Optional

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.buffer import Buffer
from deep_ep_ops.cpu.exchange import all_gather_parts, require_same, stack_rows
from deep_ep_ops.cpu.routing import build_handle, receive_layout
from deep_ep_ops.meta.shapes import (cached_dispatch_specs, combine_spec, dispatch_specs,
                                     static_capacity, tokens_from_handle)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every float type but fp64, which keeps fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _zeros(spec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype)


def _gather_rows(op: str, buf: Buffer, names: tuple[str, ...],
                 parts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every rank's ``parts`` as ``[part][rank]``. Row counts may differ between ranks; the
    number of parts (``x_scales`` given or not), dtypes and row shapes may not."""
    by_rank = all_gather_parts(buf, op, parts)
    counts = [len(p) for p in by_rank]
    if len(set(counts)) > 1:
        name = names[max(counts) - 1]
        given = [r for r, c in enumerate(counts) if c == max(counts)]
        raise ValueError(f"deep_ep.{op}: {name} must be given on every rank of "
                         f"{buf.group_name!r} or on none; got it on rank(s) {given} only")
    by_part = [list(ranks) for ranks in zip(*by_rank)] if by_rank[0] else []
    for name, per_rank in zip(names, by_part):
        require_same(op, buf, name, per_rank, rows_may_differ=True)
    return by_part


def dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
             topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             expert_alignment: int, expand: bool):
    """Static-capacity dispatch (trimming for exact mode is ``deep_ep_ops.trim``)."""
    R, rank = buf.world_size, buf.rank
    M, K, E_loc = buf.num_max_tokens_per_rank, buf.num_topk, num_experts // R
    T = x.shape[0]
    parts = [topk_idx.to(torch.int64), x, topk_weights]
    gathered = _gather_rows("dispatch", buf, ("topk_idx", "x", "topk_weights", "x_scales"),
                            parts + ([x_scales] if x_scales is not None else []))
    all_idx = stack_rows(gathered[0], M, fill=-1)  # [R, M, K]; rows past a rank's T: -1
    all_x = stack_rows(gathered[1], M)
    all_w = stack_rows(gathered[2], M)
    all_s = stack_rows(gathered[3], M) if x_scales is not None else None
    layouts = [receive_layout(all_idx, d, R, E_loc, expert_alignment, expand)
               for d in range(R)]
    mine = layouts[rank]
    C = static_capacity(R, M, K, E_loc, expert_alignment, expand)
    P = x_scales.shape[1] if x_scales is not None else 0
    specs = dispatch_specs(T, x.shape[1], x.dtype, K, P,
                           x_scales.dtype if x_scales is not None else None,
                           topk_weights.dtype, E_loc, expand, C)
    recv_x, recv_s, recv_idx, recv_w = (_zeros(s) for s in specs[:4])
    rows, src, tok = mine.row_index, mine.row_src_rank, mine.row_src_token
    recv_x[rows] = all_x[src, tok]
    if all_s is not None:
        recv_s[rows] = all_s[src, tok]
    if expand:
        recv_idx.fill_(-1)
        recv_idx[rows] = mine.row_expert.to(torch.int32)
        recv_w[rows] = all_w[src, tok, mine.row_topk_slot]
    else:
        ids = all_idx[src, tok]  # [G, K] global
        here = (ids >= 0) & (ids.div(E_loc, rounding_mode="floor") == rank)
        recv_idx.fill_(-1)
        recv_idx[rows] = torch.where(here, ids - rank * E_loc, -1)
        recv_w[rows] = torch.where(here, all_w[src, tok], torch.zeros((), dtype=recv_w.dtype))
    handle = build_handle(layouts, all_idx, rank, T, C, num_experts, expert_alignment, expand,
                          buf.id)
    return recv_x, recv_s, recv_idx, recv_w, mine.tokens_per_expert.clone(), handle


def _handle_parts(handle: torch.Tensor, num_rows: int):
    """(T, header row, receive part) of the handle of a dispatch that returned ``num_rows``."""
    T = tokens_from_handle(handle.shape[0], num_rows)
    return T, handle[0], handle[H.HEADER_ROWS + T:]


def cached_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                    handle: torch.Tensor):
    spec_x, spec_s = cached_dispatch_specs(
        x.shape, x.dtype, x_scales.shape if x_scales is not None else None,
        x_scales.dtype if x_scales is not None else None, handle.shape[0])
    _, header, recv = _handle_parts(handle, spec_x.shape[0])
    M = buf.num_max_tokens_per_rank
    recv_x, recv_s = _zeros(spec_x), _zeros(spec_s)
    gathered = _gather_rows("cached_dispatch", buf, ("x", "x_scales"),
                            [x] + ([x_scales] if x_scales is not None else []))
    all_x = stack_rows(gathered[0], M)
    src = recv[:, H.RECV_SRC_RANK].long()
    rows = (src >= 0).nonzero().flatten()
    tok = recv[rows, H.RECV_SRC_TOKEN].long()
    recv_x[rows] = all_x[src[rows], tok]
    if x_scales is not None:
        all_s = stack_rows(gathered[1], M)
        recv_s[rows] = all_s[src[rows], tok]
    return recv_x, recv_s


def combine(buf: Buffer, x: torch.Tensor, handle: torch.Tensor,
            weights: Optional[torch.Tensor]) -> torch.Tensor:
    C, width = x.shape
    T, header, recv = _handle_parts(handle, C)
    K = buf.num_topk
    acc = accumulation_dtype(x.dtype)
    terms = x.to(acc)
    if weights is not None:
        terms = terms * weights.to(acc)[:, None]
    # 1. each group's partial over its member rows, ascending, starting from the first term
    G = int(header[H.HDR_VALID_GROUPS])
    members = recv[:G, H.GROUP_MEMBER: H.GROUP_MEMBER + K].long()
    partial = terms[members[:, 0]] if G else terms.new_zeros((0, width))
    for i in range(1, K):
        m = members[:, i]
        partial = torch.where((m >= 0)[:, None], partial + terms[m.clamp(min=0)], partial)
    meta = recv[:G, [H.GROUP_SRC_RANK, H.GROUP_SRC_TOKEN]].long()
    # 2. every owner adds the partials of its tokens: inside each host in ascending rank order,
    # then the host sums in ascending host order (one host: simply ascending rank order)
    all_partials, all_meta = _gather_rows("combine", buf, ("x", "handle"), [partial, meta])
    shape = combine_spec(x.shape, x.dtype, handle.shape[0]).shape
    L = getattr(buf, "ranks_per_host", buf.world_size)
    out, started = torch.zeros(shape, dtype=acc), torch.zeros(T, dtype=torch.bool)
    for first in range(0, buf.world_size, L):
        host, host_started = torch.zeros(shape, dtype=acc), torch.zeros(T, dtype=torch.bool)
        for part, m in zip(all_partials[first:first + L], all_meta[first:first + L]):
            _add_in_order(host, host_started, m, part, buf.rank)
        tok = host_started.nonzero().flatten()
        out[tok] = torch.where(started[tok, None], out[tok] + host[tok], host[tok])
        started |= host_started
    return out.to(x.dtype)


def _add_in_order(out: torch.Tensor, started: torch.Tensor, meta: torch.Tensor,
                  part: torch.Tensor, rank: int) -> None:
    """``out[t] += part`` for the rows of ``part`` that belong to ``rank``'s tokens, each sum
    starting from its first term (so -0.0 survives)."""
    mine = meta[:, 0] == rank
    tok, val = meta[mine, 1], part[mine]
    out[tok] = torch.where(started[tok, None], out[tok] + val, val)
    started[tok] = True
