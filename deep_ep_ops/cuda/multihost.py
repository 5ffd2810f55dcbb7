"""CUDA dispatch / cached_dispatch / combine for a group that spans several hosts.

The same two-stage composition as the CPU reference (``deep_ep_ops.cpu.multihost``, whose
docstring defines the algorithm, the row order and the handle ``[1 + T + V + C, W]``), with
GPU parts only and no host sync on the static wire (CUDA-graph capturable):

1. inter-host stage (``deep_ep_ops.cuda.interhost.RailStage``: NCCL between rail peers):
   this rank's tokens are packed on the GPU into per-host slots (rail row j of host h' = the
   j-th token with an expert there), top-k restricted to h'; the slots cross to the rail peers,
   landing in this rank's virtual tokens ``[N*M]`` (slot ``h''*M + j``; its own tokens at
   ``h*M + t``);
2. intra-host stage: the single-host CUDA kernels of the host's sub-Buffer (a Buffer on the
   group of this host's L ranks, ``num_max_tokens_per_rank = V = N*M``, experts numbered
   inside the host) dispatch the virtual tokens.

combine runs the sub-Buffer's combine on rows in the accumulation dtype, which leaves one fp32
(fp64) partial per virtual token (the sum over the host's ranks), returns them over the rail,
and adds each token's host partials in ascending host order, rounding once: bit for bit the
CPU reference's order.

The exact wire (``exact=True`` dispatch): per-host counts cross first (one stream sync), then
only real rows. cached_dispatch and combine of a handle use the wire of its dispatch (the
header's ``HDR_EXACT`` flag, equal on every rank), with the exact wire's counts: a handle made
here is remembered with both and with its header's facts (``_HandleMemo``, no sync: the ops
check those facts on every call, as the C++ kernels check their handle records); any other (a
clone, a copy autograd saved after the dispatch's own tensor was dropped) costs one sync to
read them from the handle, and is refused during CUDA graph capture (a guess could leave rail
peers on different wires).

The C++ CUDA kernels of the public ops enter here through the ``_multihost_*`` ops
(schemas.py) when the Buffer spans hosts; every call goes through the dispatcher, so autograd
and torch.compile see the public ops only.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from deep_ep_ops import handle as H
from deep_ep_ops.cuda import interhost
from deep_ep_ops.hosts import RankPlace, place_of
from deep_ep_ops.meta.shapes import accumulation_dtype

# A deep_ep_ops.buffer.Buffer. Not imported: the Buffer module imports this one.
BufferT = Any


class MultiHostState:
    """What a CUDA Buffer spanning hosts owns: its host's sub-Buffer (single-host kernels on V
    virtual tokens, on the process group of this host's ranks) and the inter-host stage."""

    def __init__(self, place: RankPlace, inner: BufferT, stage: interhost.RailStage) -> None:
        self.place = place
        self.inner = inner
        self.stage = stage

    def destroy(self) -> None:
        """Collective over the group: the stage (over the rails), then the sub-Buffer."""
        self.stage.destroy()
        self.inner.destroy()


def host_group(buf: BufferT) -> dist.ProcessGroup:
    """The process group of this rank's host (made by the host's ranks alone)."""
    p = place_of(buf)
    ranks = [dist.get_global_rank(buf.group, p.h * p.L + i) for i in range(p.L)]
    return dist.new_group(ranks, backend=buf.backend, use_local_synchronization=True)


def sub_buffer_args(buf: BufferT) -> dict:
    """The sub-Buffer's arguments: V = N*M virtual tokens, this host's E/N experts, the Buffer's
    transport (no pp / cp window: those ops need a group of one host)."""
    p = place_of(buf)
    if buf.num_experts % p.N:
        raise ValueError(f"Buffer: num_experts={buf.num_experts} must be divisible by the "
                         f"{p.N} hosts")
    return dict(num_max_tokens_per_rank=p.V, hidden=buf.hidden, num_topk=buf.num_topk,
                num_experts=buf.num_experts // p.N, fp8_dispatch=buf.fp8_dispatch,
                timeout_s=buf.timeout_s, pp_max_bytes=0, cp_max_bytes=0,
                transport=buf.requested_transport, ranks_per_host=p.L)


def create(buf: BufferT, inner: BufferT) -> MultiHostState:
    """Collective over ``buf.group``: the inter-host stage; ``inner`` is the sub-Buffer the
    Buffer made on ``host_group(buf)`` with ``sub_buffer_args(buf)``."""
    return MultiHostState(place_of(buf), inner, interhost.for_buffer(buf))


# -- what a dispatch made, remembered per handle ---------------------------------------------

Counts = tuple[list[int], list[int]]  # rows sent to / received from each host
_STATIC = ()  # the memo's wire for a static-wire handle


class _Made(NamedTuple):
    wire: object  # _STATIC, or the exact wire's counts
    header: list[int]  # the header row's facts (check_rules.HEADER_FIELDS), other columns 0


class _HandleMemo:
    """What the dispatch that made a handle knew on the host: its wire and its header's facts.
    Kept while that handle's tensor object lives (its memory cannot be reused meanwhile);
    looked up by data pointer and shape, so views sharing its memory find it too."""

    def __init__(self) -> None:
        self._made: dict[tuple, _Made] = {}

    @staticmethod
    def _key(handle: torch.Tensor) -> tuple:
        return (handle.data_ptr(), tuple(handle.shape))

    def put(self, handle: torch.Tensor, made: _Made) -> None:
        key = self._key(handle)
        self._made[key] = made
        weakref.finalize(handle, self._made.pop, key, None)

    def get(self, handle: torch.Tensor) -> Optional[_Made]:
        return self._made.get(self._key(handle))


_MEMO = _HandleMemo()


def _made_header(width: int, buf: BufferT, K: int, T: int, C: int) -> list[int]:
    header = [0] * width
    for col, value in ((H.HDR_BUFFER_ID, buf.id), (H.HDR_NUM_RANKS, buf.world_size),
                       (H.HDR_TOPK, K), (H.HDR_NUM_TOKENS, T), (H.HDR_NUM_ROWS, C)):
        header[col] = value
    return header


def record_trimmed_handle(static_handle: torch.Tensor, trimmed_handle: torch.Tensor) -> None:
    """exact=True: the trimmed handle takes over the wire of the static one, with its C."""
    made = _MEMO.get(static_handle)
    if made is not None:
        header = list(made.header)
        header[H.HDR_NUM_ROWS] -= static_handle.shape[0] - trimmed_handle.shape[0]
        _MEMO.put(trimmed_handle, _Made(made.wire, header))


def recorded_header(handle: torch.Tensor) -> Optional[list[int]]:
    """The header facts of a handle a dispatch here returned (None for any other tensor)."""
    made = _MEMO.get(handle)
    return None if made is None else made.header


def _wire_of(op: str, handle: torch.Tensor, rail_rows: torch.Tensor, p: RankPlace
             ) -> Optional[Counts]:
    """The counts of the exact wire, or None for the static wire, of ``handle``'s dispatch."""
    made = _MEMO.get(handle)
    if made is not None:
        wire = made.wire
    else:
        if handle.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"deep_ep.{op}: this multi-host handle is not the tensor its dispatch returned "
                "(a clone or a copy), so its wire is only known from its header, which cannot "
                "be read during CUDA graph capture; pass the dispatch's own handle")
        wire = _read_wire(handle, rail_rows, p)
    return None if wire == _STATIC else wire


def _read_wire(handle: torch.Tensor, rail_rows: torch.Tensor, p: RankPlace) -> object:
    """The header's exact flag and, for the exact wire, the counts from the handle (one sync):
    rows sent to host g = tokens with a rail row there; received = virtual slots in use."""
    T = rail_rows.shape[0]
    virtual = handle[H.HEADER_ROWS + T:H.HEADER_ROWS + T + p.V, H.SEND_NUM_DST]
    received = (virtual.reshape(p.N, p.M) > 0).sum(-1)
    sent = (rail_rows >= 0).sum(0)
    sent[p.h] = received[p.h] = 0
    facts = torch.cat([handle[0, H.HDR_EXACT:H.HDR_EXACT + 1].long(), sent, received]).tolist()
    if not facts[0]:
        return _STATIC
    return facts[1:1 + p.N], facts[1 + p.N:]


# -- packing ----------------------------------------------------------------------------------

def _raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 rows as bytes (index_copy_ and fills have no FP8 kernels; the bytes are the same)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _slots(like: torch.Tensor, N: int, M: int, fill: float, extra: int = 0) -> torch.Tensor:
    """``[N*M + extra, ...]`` of ``like``'s raw dtype filled with ``fill`` (``extra``: a dump row
    for masked writes)."""
    raw = _raw(like)
    return torch.full((N * M + extra, *raw.shape[1:]), fill, dtype=raw.dtype,
                      device=raw.device)


def _per_host(t: torch.Tensor, N: int, M: int) -> torch.Tensor:
    return t[:N * M].view(N, M, *t.shape[1:])


def _rail_rows_from_handle(handle: torch.Tensor, p: RankPlace, T: int, K: int
                           ) -> torch.Tensor:
    """``[T, N]`` int64: token t's rail row to host g (-1: no expert there; own host: t)."""
    send = handle[H.HEADER_ROWS:H.HEADER_ROWS + T]
    hosts = send[:, H.RAIL_DST_HOST:H.RAIL_DST_HOST + K].long()
    slots = send[:, H.rail_dst_slot(K):H.rail_dst_slot(K) + K].long()
    g = torch.arange(p.N, device=handle.device)
    there = hosts.unsqueeze(-1) == g  # [T, K, N]
    # every slot k of one (token, host) names the same rail row
    return torch.where(there, (slots - p.h * p.M).unsqueeze(-1), -1).amax(1)


def _pack(parts_for: Callable[[int], Sequence[torch.Tensor]], own: Sequence[torch.Tensor],
          fills: Sequence[float], rail_rows: torch.Tensor, p: RankPlace) -> list[torch.Tensor]:
    """Send slots ``[N*M + 1, ...]``: the rows of ``parts_for(g)`` (``[T, ...]`` each, shaped
    like ``own``; what host g gets) of every token with an expert on host g at
    ``g*M + rail row`` (other hosts only); the rest ``fill``; row N*M takes masked writes."""
    dump = p.N * p.M
    sends = [_slots(t, p.N, p.M, f, extra=1) for t, f in zip(own, fills)]
    for g in range(p.N):
        if g == p.h:
            continue
        rows = rail_rows[:, g]
        dst = torch.where(rows >= 0, g * p.M + rows, dump)
        for s, t in zip(sends, parts_for(g)):
            s.index_copy_(0, dst, _raw(t))
    return sends


def _virtual(own: Sequence[torch.Tensor], fills: Sequence[float], p: RankPlace
             ) -> list[torch.Tensor]:
    """This rank's virtual tokens ``[N*M, ...]`` before the exchange: its own rows at slot
    ``h*M + t``, the rest ``fill`` (the other hosts' slots are received into)."""
    virtual = [_slots(t, p.N, p.M, f) for t, f in zip(own, fills)]
    for v, t in zip(virtual, own):
        v[p.h * p.M:p.h * p.M + t.shape[0]] = _raw(t)
    return virtual


def _exchange(op: str, stage: interhost.RailStage, sends: Sequence[torch.Tensor],
              recvs: Sequence[torch.Tensor], p: RankPlace,
              counts: Optional[Counts], back: bool = False) -> None:
    """Slots over the rails: whole slots (static wire) or the counted rows (exact wire)."""
    s = [_per_host(t, p.N, p.M) for t in sends]
    r = [_per_host(t, p.N, p.M) for t in recvs]
    sent, received = counts if counts is not None else (None, None)
    if back:  # partials go back the way the rows came
        stage.return_partials(op, s, r, send_rows=received, recv_rows=sent)
    else:
        stage.exchange_rows(op, s, r, send_rows=sent, recv_rows=received)


def _header(handle: torch.Tensor, values: dict[int, int]) -> torch.Tensor:
    """A copy of ``handle``'s header row with ``values`` (column -> value) written by fill
    kernels (no host copy: capturable)."""
    header = handle[:H.HEADER_ROWS].clone()
    for col, value in values.items():
        header[0, col:col + 1].fill_(value)
    return header


def _inner_handle(handle: torch.Tensor, mh: MultiHostState, T: int, num_experts: int
                  ) -> torch.Tensor:
    """The sub-Buffer's handle ``[1 + V + C, W]``: its header (L ranks, V tokens, the host's
    experts, the sub-Buffer's id), the virtual part and the receive part."""
    p = mh.place
    header = _header(handle, {H.HDR_NUM_TOKENS: p.V, H.HDR_NUM_RANKS: p.L,
                              H.HDR_NUM_EXPERTS: num_experts // p.N, H.HDR_MAX_TOKENS: p.V,
                              H.HDR_BUFFER_ID: mh.inner.id})
    return torch.cat([header, handle[H.HEADER_ROWS + T:]])


# -- the ops ----------------------------------------------------------------------------------

def dispatch_static(buf: BufferT, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                    topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                    expert_alignment: int, expand: bool, num_sms: int, exact_wire: bool):
    """The six outputs of ``_dispatch_static`` (static capacity; handle ``[1+T+V+C, W]``)."""
    mh: MultiHostState = buf.multihost
    p = mh.place
    dev = x.device
    T, K = topk_idx.shape
    E_host = num_experts // p.N
    idx = topk_idx.long()
    dst_host = torch.where(idx >= 0, idx.div(E_host, rounding_mode="floor"), -1)  # [T, K]
    to_host = (dst_host.unsqueeze(-1) == torch.arange(p.N, device=dev)).any(1)  # [T, N]
    rail_rows = torch.where(to_host, to_host.long().cumsum(0) - 1, -1)  # [T, N]

    # 1. inter-host stage: slots of rail rows, top-k restricted to the destination host
    def restricted(g: int) -> torch.Tensor:
        return torch.where(dst_host == g, idx, -1)

    fills = (-1, 0, 0, 0)
    rest = [x, topk_weights] + ([x_scales] if x_scales is not None else [])

    def parts_for(g: int) -> list[torch.Tensor]:
        return [restricted(g)] + rest

    own = parts_for(p.h)
    sends = _pack(parts_for, own, fills, rail_rows, p)
    virtual = _virtual(own, fills, p)
    counts = None
    if exact_wire:
        send_counts = to_host.sum(0)
        send_counts[p.h] = 0
        counts = mh.stage.counts("dispatch", send_counts)
    _exchange("dispatch", mh.stage, sends, virtual, p, counts)
    v_idx = virtual[0]
    virtual[0] = torch.where(v_idx >= 0, v_idx - p.h * E_host, -1)
    virtual[1] = virtual[1].view(x.dtype)

    # 2. intra-host stage on the sub-Buffer
    outs = torch.ops.deep_ep._dispatch_static(
        virtual[1], virtual[3] if x_scales is not None else None, virtual[0], virtual[2],
        mh.inner.group_name, E_host, expert_alignment, expand, num_sms)
    handle = _outer_handle(outs[5], buf, p, T, num_experts, dst_host, to_host, rail_rows)
    _MEMO.put(handle, _Made(counts if counts is not None else _STATIC,
                            _made_header(handle.shape[1], buf, K, T, outs[0].shape[0])))
    return (*outs[:5], handle)


def _outer_handle(intra: torch.Tensor, buf: BufferT, p: RankPlace, T: int, num_experts: int,
                  dst_host: torch.Tensor, to_host: torch.Tensor,
                  rail_rows: torch.Tensor) -> torch.Tensor:
    """The group's handle from the sub-Buffer's ``[1 + V + C, W]`` (cpu/multihost.py
    ``_outer_handle``, on the GPU)."""
    K = dst_host.shape[1]
    dev = intra.device
    send = torch.full((T, intra.shape[1]), -1, dtype=torch.int64, device=dev)
    send[:, H.RAIL_NUM_HOSTS] = to_host.sum(-1)
    send[:, H.RAIL_DST_HOST:H.RAIL_DST_HOST + K] = dst_host
    slot = rail_rows.clone()
    slot[:, p.h] = torch.where(to_host[:, p.h], torch.arange(T, device=dev), -1)
    rail_row = slot.gather(1, dst_host.clamp(min=0))
    send[:, H.rail_dst_slot(K):H.rail_dst_slot(K) + K] = \
        torch.where(dst_host >= 0, p.h * p.M + rail_row, -1)
    header = _header(intra, {H.HDR_NUM_TOKENS: T, H.HDR_NUM_RANKS: buf.world_size,
                             H.HDR_NUM_EXPERTS: num_experts, H.HDR_MAX_TOKENS: p.M,
                             H.HDR_BUFFER_ID: buf.id})
    return torch.cat([header, send.to(torch.int32), intra[H.HEADER_ROWS:]])


def cached_dispatch(buf: BufferT, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                    handle: torch.Tensor, num_sms: int):
    """The dispatch's two stages with new rows (the handle's routing)."""
    mh: MultiHostState = buf.multihost
    p = mh.place
    T, K = x.shape[0], buf.num_topk
    rail_rows = _rail_rows_from_handle(handle, p, T, K)
    parts = [x] + ([x_scales] if x_scales is not None else [])
    sends = _pack(lambda g: parts, parts, (0, 0), rail_rows, p)
    virtual = _virtual(parts, (0, 0), p)
    _exchange("cached_dispatch", mh.stage, sends, virtual, p,
              _wire_of("cached_dispatch", handle, rail_rows, p))
    inner = _inner_handle(handle, mh, T, buf.num_experts)
    return torch.ops.deep_ep.cached_dispatch(
        virtual[0].view(x.dtype), virtual[1] if x_scales is not None else None, inner,
        mh.inner.group_name, num_sms)


def combine(buf: BufferT, x: torch.Tensor, handle: torch.Tensor,
            weights: Optional[torch.Tensor], num_sms: int) -> torch.Tensor:
    """Host partials (the sub-Buffer's combine of rows in the accumulation dtype), back over
    the rails, summed per token in ascending host order, rounded once to x's dtype."""
    mh: MultiHostState = buf.multihost
    p = mh.place
    C, width = x.shape
    K = buf.num_topk
    acc = accumulation_dtype(x.dtype)
    T = handle.shape[0] - H.HEADER_ROWS - p.V - C
    rail_rows = _rail_rows_from_handle(handle, p, T, K)
    wire = _wire_of("combine", handle, rail_rows, p)
    inner = _inner_handle(handle, mh, T, buf.num_experts)
    host_sum = torch.ops.deep_ep.combine(x.to(acc), inner, weights, mh.inner.group_name,
                                         num_sms)  # [V, width] acc
    returned = torch.empty_like(host_sum)
    _exchange("combine", mh.stage, [host_sum], [returned], p, wire, back=True)

    out = torch.zeros(T, width, dtype=acc, device=x.device)
    started = torch.zeros(T, 1, dtype=torch.bool, device=x.device)
    for g in range(p.N):
        rows = rail_rows[:, g]
        there = (rows >= 0).unsqueeze(-1)
        source = host_sum if g == p.h else returned
        val = source[g * p.M + rows.clamp(min=0)]
        out = torch.where(there, torch.where(started, out + val, val), out)
        started = started | there
    return out.to(x.dtype)
