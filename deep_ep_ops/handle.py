"""Layout of the routing ``handle`` that ``dispatch`` returns (one source of truth).

The C++ kernels read the same layout from ``generated/handle_layout.hpp``, which
``deep_ep_ops/codegen/handle_layout.py`` renders from this module at build time (every
upper-case int constant below, and ``send_dst_row`` / ``handle_width`` from their column terms).

The handle is an int32 tensor ``[1 + T + V + C, W]`` with ``W = handle_width(K)`` (``V``: the
virtual rows of a group on several hosts, 0 on one host; docs/contract.md). It carries every
fact ``combine`` and ``cached_dispatch`` need, so routing state travels as a tensor (compile,
export and CUDA graphs see only tensors). ``T`` is recovered by shape arithmetic:
``T = handle.size(0) - 1 - V - C`` where ``C`` is the row count of the dispatch output.

Row 0, the header: ``[num_valid_rows, num_valid_groups, T, R, E, M, expand, A, K, buffer_id,
C, exact, 0...]``: ``exact`` is 1 when the handle was trimmed by ``exact=True`` (every rank's
handle of one dispatch says the same, so cached_dispatch and combine on several hosts pick the
same inter-host wire on every rank); ``buffer_id`` names the Buffer whose dispatch made the handle (``Buffer.id``, unique
in the process) and ``C`` the rows that dispatch returned, so combine and cached_dispatch can
tell a handle of another Buffer, group or dispatch from the right one.

Rows ``1 .. T`` (send part, one per local token ``t``):
  * ``SEND_NUM_DST``: number of distinct destination ranks of ``t``.
  * ``SEND_DST_RANK + k``: rank holding expert ``topk_idx[t, k]`` (-1 where the entry is -1).
  * ``SEND_DST_ROW + k``: the output row at that rank that carries slot ``k``: the token's
    compact row (equal for all slots of one rank) or the (token, expert) row in expert-major
    layout; -1 where the entry is -1.

Rows ``1 + T .. T + C`` (receive part; receive row ``j`` is handle row ``1 + T + j``). Two
independent column sets share these rows:
  * per output row ``j``: ``RECV_SRC_RANK`` (-1 for padding / unused capacity),
    ``RECV_SRC_TOKEN``, ``RECV_TOPK_SLOT`` (expert-major: the topk position the row carries;
    compact: -1) and ``RECV_GROUP`` (the row's group, below).
  * per group ``g``: a group is one (source rank, source token) pair received here, in compact
    order (source rank, source token); there are at most ``C`` of them. ``GROUP_SRC_RANK`` (-1
    when ``g`` is past the valid groups), ``GROUP_SRC_TOKEN``, ``GROUP_COMBINE_SLOT`` (the
    index of this rank among the token's destination ranks in ascending order: where combine
    writes the group's partial sum at the source) and ``GROUP_MEMBER + i`` (the rows of the
    group in ascending order, -1 padded; compact layout: exactly ``[g]``).

Several hosts (N > 1 hosts of L ranks; ``deep_ep_ops.cpu.multihost`` defines the algorithm):
the handle is ``[1 + T + V + C, W]`` with ``V = N*M`` virtual-token rows
(``meta.shapes.virtual_tokens``; V = 0 on one host, whose handles are exactly the layout
above). ``T = handle.size(0) - 1 - V - C``; the receive part is always the last C rows.

  * Row 0: the header above, of the whole group (T, R, E, M); valid rows / groups are those
    of the receive part.
  * Rows ``1 .. T``, the rail send part (one per local token ``t``; unused columns -1):
    ``RAIL_NUM_HOSTS`` distinct destination hosts of ``t``; ``RAIL_DST_HOST + k`` the host
    holding expert ``topk_idx[t, k]``; ``rail_dst_slot(K) + k`` the virtual slot that carries
    the token on its rail peer there: ``h*M + j``, h this rank's host, j the token's rail row
    to that host (its rank among this rank's tokens with an expert there; own host: j = t).
  * Rows ``1 + T .. T + V``, the virtual part: the send part (columns as above) of the
    intra-host dispatch of this rank's V virtual tokens, slot ``v = h''*M + j`` holding rail
    row j from rail source ``(h'', l)``: ``SEND_NUM_DST`` distinct destination ranks of the
    host (0: slot unused), ``SEND_DST_RANK + k`` their local index in the host,
    ``send_dst_row(K) + k`` the row there.
  * Rows ``1 + T + V ..``, the receive part of that intra-host dispatch: columns as above with
    source ranks given as local indices in the host (the forwarder l') and source tokens as
    virtual slots.

Combine's fixed order: ``out[t] = sum_i partial_i`` over the token's destination ranks in
ascending order (several hosts: the ranks of each host first, giving one host partial per
(token, host) on the forwarder, then the host partials in ascending host order), ``partial = sum`` over the group's member rows in ascending order of
``w[row] * x[row]``; every product and sum is rounded to the accumulation dtype (fp32, or fp64
for fp64 inputs) with no fused multiply-add, each sum starts from its first term (so -0.0 is
kept), and the result is rounded once to the output dtype. Tokens routed nowhere give +0.
"""
from __future__ import annotations

HEADER_ROWS = 1

# header columns (row 0)
HDR_VALID_ROWS = 0
HDR_VALID_GROUPS = 1
HDR_NUM_TOKENS = 2
HDR_NUM_RANKS = 3
HDR_NUM_EXPERTS = 4
HDR_MAX_TOKENS = 5
HDR_EXPAND = 6
HDR_ALIGNMENT = 7
HDR_TOPK = 8
HDR_BUFFER_ID = 9
HDR_NUM_ROWS = 10
HDR_EXACT = 11
NUM_HEADER_FIELDS = 12

# send part
SEND_NUM_DST = 0
SEND_DST_RANK = 1  # + k


# Columns that depend on K are written as terms (columns, columns per topk slot), so the Python
# functions and the rendered C++ ones evaluate one formula.
SEND_DST_ROW_TERM = (SEND_DST_RANK, 1)  # after the K destination ranks


def send_dst_row(num_topk: int) -> int:
    """First column of the per-slot destination rows in the send part."""
    base, per_slot = SEND_DST_ROW_TERM
    return base + per_slot * num_topk


# rail send part of a multi-host handle (rows 1 .. T)
RAIL_NUM_HOSTS = 0
RAIL_DST_HOST = 1  # + k


# (base, per top-k slot) of rail_dst_slot: one formula for Python and the generated C++
RAIL_DST_SLOT_TERM = (RAIL_DST_HOST, 1)


def rail_dst_slot(num_topk: int) -> int:
    """First column of the per-slot virtual slots at the rail peers (multi-host send part)."""
    base, per_slot = RAIL_DST_SLOT_TERM
    return base + per_slot * num_topk


# receive part, per row
RECV_SRC_RANK = 0
RECV_SRC_TOKEN = 1
RECV_TOPK_SLOT = 2
RECV_GROUP = 3
# receive part, per group
GROUP_SRC_RANK = 4
GROUP_SRC_TOKEN = 5
GROUP_COMBINE_SLOT = 6
GROUP_MEMBER = 7  # + i, i < K


# The handle is as wide as the widest of its parts.
WIDTH_TERMS = (
    (1, 2),                  # send part: SEND_NUM_DST, K destination ranks, K destination rows
    (GROUP_MEMBER, 1),       # receive part: 7 columns, then K group members
    (NUM_HEADER_FIELDS, 0),  # header
)


def handle_width(num_topk: int) -> int:
    """Columns of the handle: wide enough for the send part (1 + 2K), the receive part
    (7 + K) and the header."""
    return max(base + per_slot * num_topk for base, per_slot in WIDTH_TERMS)
