"""Reference dispatch, cached_dispatch and combine on groups of several hosts (gloo, CPU).

One host: exactly ``deep_ep_ops.cpu.moe`` (same code, same bits, same handle). Several hosts
(N hosts of L ranks; rank ``(h, l)`` = group rank ``h*L + l``): the composition of two stages,
which is what the CUDA backend will run, so its outputs can be compared bit for bit.

dispatch on rank (h, l), tokens ``t < T``:

1. inter-host stage (``interhost.InterHostStage.exchange_rows``): to each other host h', the
   rows of the tokens with at least one expert on h' (one per (token, host), in ascending token
   order: the *rail rows* ``j = 0 .. n-1``), their top-k restricted to h' (other slots -1)
   and weights, go to the rail peer (h', l);
2. intra-host stage: this rank's *virtual tokens* are ``V = N*M`` slots, slot
   ``v = h''*M + j`` holding row j from rail source (h'', l), for every host h'' in ascending
   order (h'' = h: its own token j, top-k restricted to h; unused slots: no expert). The L ranks
   of host h dispatch their virtual tokens among themselves with the single-host algorithm
   (``moe.dispatch_gathered``: R = L, M = V, experts numbered inside the host).

Hence the receive order: (forwarding local rank l', source host h'', source token t), inside
each local expert's block in the expert-major layout; with one host, (source rank, token) as
always. The static capacity is the single-host one (L*V = R*M).

combine mirrors it: the single-host combine of host h (``moe.group_partials`` then
``moe.sum_partials`` over the host's ranks in ascending local order) leaves one partial per
virtual token on its forwarder, in the accumulation dtype; those go back over the rail
(``return_partials``), and rank (h, l) adds, per token, the partials of its destination hosts
in ascending host order, starting from the first, then rounds once to x's dtype.

The handle (``deep_ep_ops.handle``, "Several hosts") is ``[1 + T + V + C, W]``: header, the
rail send part (T rows), the virtual part (the intra-host handle's send part, V rows) and the
receive part (the intra-host handle's receive part, C rows; ranks in it are local indices,
tokens virtual slots).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.cpu import interhost, moe
from deep_ep_ops.hosts import RankPlace, place_of
from deep_ep_ops.meta.shapes import (accumulation_dtype, buffer_num_hosts, cached_dispatch_specs,
                                     combine_spec, tokens_from_handle)


def _stack(per_rank: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(per_rank)


# -- dispatch ---------------------------------------------------------------------------------

def dispatch(buf, x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: torch.Tensor,
             topk_weights: torch.Tensor, num_experts: int, expert_alignment: int,
             expand: bool):
    """Static-capacity dispatch on any number of hosts (the op's six outputs; the handle
    ``[1 + T + V + C, W]`` int32, V = 0 on one host)."""
    if buffer_num_hosts(buf) == 1:
        return moe.dispatch(buf, x, x_scales, topk_idx, topk_weights, num_experts,
                            expert_alignment, expand)
    p = place_of(buf)
    T = x.shape[0]
    E_host = num_experts // p.N  # experts per host: host h holds [h*E_host, (h+1)*E_host)
    idx = topk_idx.to(torch.int64)
    dst_host = torch.where(idx >= 0, idx.div(E_host, rounding_mode="floor"), -1)  # [T, K]

    # 1. inter-host stage: one rail row per (token, other destination host)
    slot = torch.full((T, p.N), -1, dtype=torch.int64)  # rail row of (t, host); own host: t
    rows_by_host = {}
    for host in range(p.N):
        to_host = (dst_host == host).any(-1)
        tok = to_host.nonzero().flatten()
        slot[tok, host] = tok if host == p.h else torch.arange(tok.numel())
        if host != p.h:
            parts = [torch.where(dst_host[tok] == host, idx[tok], -1), x[tok],
                     topk_weights[tok]]
            rows_by_host[host] = parts + ([x_scales[tok]] if x_scales is not None else [])
    stage = interhost.make_stage(buf)
    fills = (-1, 0, 0, 0)
    received = stage.exchange_rows("dispatch", rows_by_host, fills)

    # 2. virtual tokens: slot h''*M + j <- rail row j of host h'' (own tokens at h*M + t)
    V, M = p.V, p.M
    own = [torch.where(dst_host == p.h, idx, -1), x, topk_weights] + \
        ([x_scales] if x_scales is not None else [])
    virtual = [torch.full((V, *t.shape[1:]), f, dtype=t.dtype) for t, f in zip(own, fills)]
    for host in range(p.N):
        parts = own if host == p.h else received[host]
        for v, part in zip(virtual, parts):
            v[host * M: host * M + part.shape[0]] = part
    # experts numbered inside the host, as the single-host algorithm on L ranks sees them
    v_idx = virtual[0]
    virtual[0] = torch.where(v_idx >= 0, v_idx - p.h * E_host, -1)

    # 3. intra-host stage: the single-host dispatch of the virtual tokens over host h's ranks
    names = ("topk_idx", "x", "topk_weights", "x_scales")
    gathered = moe._gather_rows("dispatch", buf, names, virtual, ranks=p.host_ranks)
    stacked = [_stack(g) for g in gathered]
    outs = moe.dispatch_gathered(stacked[0], stacked[1], stacked[2],
                                 stacked[3] if x_scales is not None else None, p.l, V, E_host,
                                 expert_alignment, expand, buf.id)
    handle = _outer_handle(outs[5], buf, p, T, num_experts, dst_host, slot)
    return (*outs[:5], handle)


def _outer_handle(intra: torch.Tensor, buf, p: RankPlace, T: int, num_experts: int,
                  dst_host: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The multi-host handle from the intra-host one ``[1 + V + C, W]`` (whose header speaks of
    L ranks and V tokens): the group's header, the rail send part, then the intra-host rows."""
    K = buf.num_topk
    W = intra.shape[1]
    send = torch.full((T, W), -1, dtype=torch.int64)
    distinct = torch.zeros(T, p.N + 1, dtype=torch.bool)
    distinct.scatter_(1, dst_host + 1, True)
    send[:, H.RAIL_NUM_HOSTS] = distinct[:, 1:].sum(-1)
    send[:, H.RAIL_DST_HOST: H.RAIL_DST_HOST + K] = dst_host
    # the slot of (t, k) at the rail peer on its host: that host's virtual slot of token t
    rail_row = slot.gather(1, dst_host.clamp(min=0))
    send[:, H.rail_dst_slot(K): H.rail_dst_slot(K) + K] = \
        torch.where(dst_host >= 0, p.h * p.M + rail_row, -1)
    header = intra[:1].clone()
    header[0, H.HDR_NUM_TOKENS] = T
    header[0, H.HDR_NUM_RANKS] = buf.world_size
    header[0, H.HDR_NUM_EXPERTS] = num_experts
    header[0, H.HDR_MAX_TOKENS] = p.M
    return torch.cat([header, send.to(torch.int32), intra[H.HEADER_ROWS:]])


# -- the handle's parts -----------------------------------------------------------------------

@dataclass
class _Parts:
    T: int
    header: torch.Tensor
    send: torch.Tensor  # [T, W] rail send part
    virtual: torch.Tensor  # [V, W] intra-host send part of the virtual tokens
    recv: torch.Tensor  # [C, W] receive part


def _split(handle: torch.Tensor, num_rows: int, V: int) -> _Parts:
    T = tokens_from_handle(handle.shape[0], num_rows, V)
    at = H.HEADER_ROWS + T
    return _Parts(T, handle[0], handle[H.HEADER_ROWS:at], handle[at:at + V], handle[at + V:])


def _wire_for(parts: _Parts) -> str:
    """The wire of a cached_dispatch / combine: exact after an exact dispatch (the header's flag,
    set by the trim on every rank alike: a rank whose trimmed rows happen to fill the static
    capacity must not pick the static wire while its rail peers pick the exact one), else
    static."""
    return "exact" if int(parts.header[H.HDR_EXACT]) else "static"


def _tokens_to(parts: _Parts, p: RankPlace, K: int, host: int) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """(tokens, their rail rows at ``host``) of this rank's tokens with an expert there, in
    rail-row order (= ascending token order)."""
    hosts = parts.send[:, H.RAIL_DST_HOST: H.RAIL_DST_HOST + K].long()
    slots = parts.send[:, H.rail_dst_slot(K): H.rail_dst_slot(K) + K].long()
    there = hosts == host
    tok = there.any(-1).nonzero().flatten()
    k = there[tok].to(torch.int64).argmax(-1)
    return tok, slots[tok, k] - p.h * p.M


def _rail_counts_in(parts: _Parts, p: RankPlace) -> dict[int, int]:
    """Rail rows each other host sent here: its virtual slots in use (every rail row has an
    expert on this host)."""
    used = parts.virtual[:, H.SEND_NUM_DST] > 0
    return {host: int(used[host * p.M:(host + 1) * p.M].sum()) for host in range(p.N)
            if host != p.h}


def cached_dispatch(buf, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                    handle: torch.Tensor):
    """cached_dispatch on any number of hosts: the dispatch's two stages with new rows."""
    if buffer_num_hosts(buf) == 1:
        return moe.cached_dispatch(buf, x, x_scales, handle)
    p = place_of(buf)
    K = buf.num_topk
    spec_x, spec_s = cached_dispatch_specs(
        x.shape, x.dtype, x_scales.shape if x_scales is not None else None,
        x_scales.dtype if x_scales is not None else None, handle.shape[0], p.V)
    C = spec_x.shape[0]
    parts = _split(handle, C, p.V)
    own = [x] + ([x_scales] if x_scales is not None else [])
    rows_by_host = {}
    for host in range(p.N):
        if host != p.h:
            tok, _ = _tokens_to(parts, p, K, host)
            rows_by_host[host] = [t[tok] for t in own]
    stage = interhost.make_stage(buf, _wire_for(parts))
    received = stage.exchange_rows("cached_dispatch", rows_by_host, (0, 0),
                                   expect=_rail_counts_in(parts, p))
    virtual = [torch.zeros((p.V, *t.shape[1:]), dtype=t.dtype) for t in own]
    for host in range(p.N):
        got = own if host == p.h else received[host]
        for v, part in zip(virtual, got):
            v[host * p.M: host * p.M + part.shape[0]] = part
    gathered = moe._gather_rows("cached_dispatch", buf, ("x", "x_scales"), virtual,
                                ranks=p.host_ranks)
    all_x = _stack(gathered[0])
    all_s = _stack(gathered[1]) if x_scales is not None else None
    return moe.cached_gathered(all_x, all_s, parts.recv, spec_x, spec_s)


# -- combine ----------------------------------------------------------------------------------

def combine(buf, x: torch.Tensor, handle: torch.Tensor,
            weights: Optional[torch.Tensor]) -> torch.Tensor:
    """combine on any number of hosts: out[t] = sum over t's destination hosts in ascending
    host order of the host partial (sum over the host's destination ranks in ascending order of
    the rank partials), fp32 throughout (fp64 for fp64), rounded once to x's dtype."""
    if buffer_num_hosts(buf) == 1:
        return moe.combine(buf, x, handle, weights)
    p = place_of(buf)
    K = buf.num_topk
    C, width = x.shape
    acc = accumulation_dtype(x.dtype)
    parts = _split(handle, C, p.V)
    T = combine_spec(x.shape, x.dtype, handle.shape[0], p.V).shape[0]

    # intra-host stage: rank partials to the forwarders, summed there in ascending local rank
    partial, meta = moe.group_partials(x, weights, parts.header, parts.recv, K)
    all_partials, all_meta = moe._gather_rows("combine", buf, ("x", "handle"),
                                              [partial, meta], ranks=p.host_ranks)
    host_sum, _ = moe.sum_partials(all_partials, all_meta, p.l, p.V, width, acc)

    # inter-host stage: each host partial back to the rail peer whose row it sums
    counts_in = _rail_counts_in(parts, p)
    back = {host: host_sum[host * p.M: host * p.M + counts_in[host]] for host in counts_in}
    tokens = {host: _tokens_to(parts, p, K, host) for host in range(p.N)}
    stage = interhost.make_stage(buf, _wire_for(parts))
    returned = stage.return_partials("combine", back, expect={
        host: int(tok.numel()) for host, (tok, _) in tokens.items() if host != p.h})

    # the source: host partials in ascending host order, each sum from its first term
    out = torch.zeros(T, width, dtype=acc)
    started = torch.zeros(T, dtype=torch.bool)
    for host in range(p.N):
        tok, rail_row = tokens[host]
        val = host_sum[p.h * p.M + tok] if host == p.h else returned[host][rail_row]
        out[tok] = torch.where(started[tok, None], out[tok] + val, val)
        started[tok] = True
    return out.to(x.dtype)
