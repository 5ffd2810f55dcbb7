"""Reference dispatch, cached_dispatch and combine over one host (gloo, CPU tensors).

The ``*_gathered`` / ``group_partials`` / ``sum_partials`` steps take tensors, not a group, so
the multi-host reference (``deep_ep_ops.cpu.multihost``) runs the very same single-host
algorithm on the ranks of each host (its intra-host stage)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.buffer import Buffer
from deep_ep_ops.cpu.exchange import (all_gather_parts, gather_parts, require_same,
                                      stack_rows)
from deep_ep_ops.cpu.routing import build_handle, receive_layout
from deep_ep_ops.meta.shapes import (accumulation_dtype, cached_dispatch_specs, combine_spec,
                                     dispatch_specs, static_capacity, tokens_from_handle)


def _zeros(spec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype)


def _gather_rows(op: str, buf: Buffer, names: tuple[str, ...], parts: list[torch.Tensor],
                 ranks: Optional[Sequence[int]] = None) -> list[list[torch.Tensor]]:
    """Every rank's ``parts`` as ``[part][rank]`` (the ranks of ``ranks`` only, in that order,
    when given: one host's ranks). Row counts may differ between ranks; the number of parts
    (``x_scales`` given or not), dtypes and row shapes may not."""
    by_rank = (all_gather_parts(buf, op, parts) if ranks is None
               else gather_parts(buf, op, parts, ranks))
    counts = [len(p) for p in by_rank]
    if len(set(counts)) > 1:
        name = names[max(counts) - 1]
        given = [r for r, c in zip(ranks or range(len(counts)), counts) if c == max(counts)]
        raise ValueError(f"deep_ep.{op}: {name} must be given on every rank of "
                         f"{buf.group_name!r} or on none; got it on rank(s) {given} only")
    by_part = [list(ranks) for ranks in zip(*by_rank)] if by_rank[0] else []
    for name, per_rank in zip(names, by_part):
        require_same(op, buf, name, per_rank, rows_may_differ=True)
    return by_part


def dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
             topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
             expert_alignment: int, expand: bool):
    """Static-capacity dispatch over one host (trimming for exact mode is
    ``deep_ep_ops.trim``; several hosts: ``deep_ep_ops.cpu.multihost``)."""
    M = buf.num_max_tokens_per_rank
    parts = [topk_idx.to(torch.int64), x, topk_weights]
    gathered = _gather_rows("dispatch", buf, ("topk_idx", "x", "topk_weights", "x_scales"),
                            parts + ([x_scales] if x_scales is not None else []))
    all_idx = stack_rows(gathered[0], M, fill=-1)  # [R, M, K]; rows past a rank's T: -1
    all_x = stack_rows(gathered[1], M)
    all_w = stack_rows(gathered[2], M)
    all_s = stack_rows(gathered[3], M) if x_scales is not None else None
    return dispatch_gathered(all_idx, all_x, all_w, all_s, buf.rank, x.shape[0], num_experts,
                             expert_alignment, expand, buf.id)


def dispatch_gathered(all_idx: torch.Tensor, all_x: torch.Tensor, all_w: torch.Tensor,
                      all_s: Optional[torch.Tensor], rank: int, num_tokens: int,
                      num_experts: int, expert_alignment: int, expand: bool, buffer_id: int):
    """The single-host dispatch of ``rank`` from every rank's inputs, stacked:
    ``all_idx [R, M, K]`` int64 (rows past a rank's T: -1), ``all_x [R, M, H]``,
    ``all_w [R, M, K]``, ``all_s [R, M, P]`` or None. Returns the op's six outputs with
    C = static capacity of (R, M). The multi-host reference runs it on one host's ranks with
    their virtual tokens (R = L, M = V, experts numbered inside the host)."""
    R, M, K = all_idx.shape
    E_loc = num_experts // R
    layouts = [receive_layout(all_idx, d, R, E_loc, expert_alignment, expand)
               for d in range(R)]
    mine = layouts[rank]
    C = static_capacity(R, M, K, E_loc, expert_alignment, expand)
    P = all_s.shape[2] if all_s is not None else 0
    specs = dispatch_specs(num_tokens, all_x.shape[2], all_x.dtype, K, P,
                           all_s.dtype if all_s is not None else None,
                           all_w.dtype, E_loc, expand, C)
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
    handle = build_handle(layouts, all_idx, rank, num_tokens, C, num_experts,
                          expert_alignment, expand, buffer_id)
    return recv_x, recv_s, recv_idx, recv_w, mine.tokens_per_expert.clone(), handle


def _handle_parts(handle: torch.Tensor, num_rows: int):
    """(T, header row, receive part) of the handle of a dispatch that returned ``num_rows``."""
    T = tokens_from_handle(handle.shape[0], num_rows)
    return T, handle[0], handle[H.HEADER_ROWS + T:]


def cached_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                    handle: torch.Tensor):
    """cached_dispatch over one host (several hosts: ``deep_ep_ops.cpu.multihost``)."""
    spec_x, spec_s = cached_dispatch_specs(
        x.shape, x.dtype, x_scales.shape if x_scales is not None else None,
        x_scales.dtype if x_scales is not None else None, handle.shape[0])
    _, header, recv = _handle_parts(handle, spec_x.shape[0])
    M = buf.num_max_tokens_per_rank
    gathered = _gather_rows("cached_dispatch", buf, ("x", "x_scales"),
                            [x] + ([x_scales] if x_scales is not None else []))
    all_x = stack_rows(gathered[0], M)
    all_s = stack_rows(gathered[1], M) if x_scales is not None else None
    return cached_gathered(all_x, all_s, recv, spec_x, spec_s)


def cached_gathered(all_x: torch.Tensor, all_s: Optional[torch.Tensor], recv: torch.Tensor,
                    spec_x, spec_s) -> tuple[torch.Tensor, torch.Tensor]:
    """``recv_x [C, H']`` and ``recv_x_scales [C, P]`` from every rank's rows stacked
    (``all_x [R, M, H']``, ``all_s [R, M, P]`` or None) and the handle's receive part ``recv
    [C, W]``: row j is ``all_x[RECV_SRC_RANK, RECV_SRC_TOKEN]``, zero where the rank is -1."""
    recv_x, recv_s = _zeros(spec_x), _zeros(spec_s)
    src = recv[:, H.RECV_SRC_RANK].long()
    rows = (src >= 0).nonzero().flatten()
    tok = recv[rows, H.RECV_SRC_TOKEN].long()
    recv_x[rows] = all_x[src[rows], tok]
    if all_s is not None:
        recv_s[rows] = all_s[src[rows], tok]
    return recv_x, recv_s


def group_partials(x: torch.Tensor, weights: Optional[torch.Tensor], header: torch.Tensor,
                   recv: torch.Tensor, num_topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine's first step on the rank that holds the rows: each group's partial
    ``[G, H']`` in the accumulation dtype (the sum over its member rows in ascending row order
    of ``w[row] * x[row]``, starting from the first term) and its ``(source rank, source
    token)`` ``[G, 2]`` int64, from the handle's header row and receive part ``recv``."""
    width = x.shape[1]
    acc = accumulation_dtype(x.dtype)
    terms = x.to(acc)
    if weights is not None:
        terms = terms * weights.to(acc)[:, None]
    G = int(header[H.HDR_VALID_GROUPS])
    members = recv[:G, H.GROUP_MEMBER: H.GROUP_MEMBER + num_topk].long()
    partial = terms[members[:, 0]] if G else terms.new_zeros((0, width))
    for i in range(1, num_topk):
        m = members[:, i]
        partial = torch.where((m >= 0)[:, None], partial + terms[m.clamp(min=0)], partial)
    meta = recv[:G, [H.GROUP_SRC_RANK, H.GROUP_SRC_TOKEN]].long()
    return partial, meta


def sum_partials(all_partials: Sequence[torch.Tensor], all_meta: Sequence[torch.Tensor],
                 owner: int, num_tokens: int, width: int,
                 acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine's second step on the owner of the tokens: ``out [T, H']`` (accumulation dtype)
    = for each token the sum of the partials that name ``owner`` as source rank, taken in the
    order of ``all_partials`` (ascending destination rank), each sum starting from its first
    term; ``started [T]`` bool: the tokens that got a partial (the rest stay +0)."""
    out = torch.zeros(num_tokens, width, dtype=acc)
    started = torch.zeros(num_tokens, dtype=torch.bool)
    for part, meta in zip(all_partials, all_meta):
        _add_in_order(out, started, meta, part, owner)
    return out, started


def combine(buf: Buffer, x: torch.Tensor, handle: torch.Tensor,
            weights: Optional[torch.Tensor]) -> torch.Tensor:
    """combine over one host: out[t] = the partials of t's destination ranks summed in
    ascending rank order (several hosts: ``deep_ep_ops.cpu.multihost``, host sums first)."""
    C, width = x.shape
    T, header, recv = _handle_parts(handle, C)
    partial, meta = group_partials(x, weights, header, recv, buf.num_topk)
    all_partials, all_meta = _gather_rows("combine", buf, ("x", "handle"), [partial, meta])
    shape = combine_spec(x.shape, x.dtype, handle.shape[0]).shape
    out, _ = sum_partials(all_partials, all_meta, buf.rank, shape[0], width,
                          accumulation_dtype(x.dtype))
    return out.to(x.dtype)


def _add_in_order(out: torch.Tensor, started: torch.Tensor, meta: torch.Tensor,
                  part: torch.Tensor, rank: int) -> None:
    """``out[t] += part`` for the rows of ``part`` that belong to ``rank``'s tokens, each sum
    starting from its first term (so -0.0 survives)."""
    mine = meta[:, 0] == rank
    tok, val = meta[mine, 1], part[mine]
    out[tok] = torch.where(started[tok, None], out[tok] + val, val)
    started[tok] = True
