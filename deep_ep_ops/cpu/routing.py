"""The routing plan of a dispatch: where every (token, expert) pair of every rank lands.

Pure functions of the gathered ``topk_idx`` of all ranks; the reference dispatch builds its
outputs and its handle from them. Row orders are defined here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deep_ep_ops import handle as H


@dataclass
class ReceiveLayout:
    """What one destination rank ``d`` receives.

    rows: ``row_src_rank/row_src_token/row_topk_slot/row_expert`` for each valid row
    (compact: topk slot -1 and expert -1), ``row_index`` its output row (expert-major rows
    skip alignment padding), ``row_group`` its group; groups: ``group_src_rank/
    group_src_token/group_combine_slot`` and ``group_members [G, K]`` (-1 padded).
    """
    row_index: torch.Tensor
    row_src_rank: torch.Tensor
    row_src_token: torch.Tensor
    row_topk_slot: torch.Tensor
    row_expert: torch.Tensor
    row_group: torch.Tensor
    group_src_rank: torch.Tensor
    group_src_token: torch.Tensor
    group_combine_slot: torch.Tensor
    group_members: torch.Tensor
    tokens_per_expert: torch.Tensor  # [E_loc] int32, real counts


def _exclusive_cumsum(v: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(v, 0) - v


def destination_ranks(all_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """``[R, M, K]`` rank of each selected expert, -1 where the slot is empty."""
    return torch.where(all_idx >= 0, all_idx.div(num_local_experts, rounding_mode="floor"), -1)


def receive_layout(all_idx: torch.Tensor, dst: int, num_ranks: int, num_local_experts: int,
                   alignment: int, expand: bool) -> ReceiveLayout:
    """Layout at rank ``dst`` given every rank's ``topk_idx`` gathered as ``[R, M, K]`` int64
    (rows past a rank's T hold -1)."""
    R, M, K = all_idx.shape
    ranks = destination_ranks(all_idx, num_local_experts)
    local = ranks == dst  # [R, M, K]
    to_dst = local.any(-1)  # [R, M]
    g_src, g_tok = to_dst.nonzero(as_tuple=True)  # row-major: ordered by (rank, token)
    G = g_src.numel()
    # Combine slot: how many distinct destination ranks of the token are below dst.
    sends_to = torch.zeros(R, M, num_ranks + 1, dtype=torch.bool)
    sends_to.scatter_(2, (ranks + 1).clamp(min=0), True)  # column 0 collects the -1 slots
    slots_below = sends_to[:, :, 1:dst + 1].sum(-1)
    group_slot = slots_below[g_src, g_tok]
    token_group = torch.full((R, M), -1, dtype=torch.int64)
    token_group[g_src, g_tok] = torch.arange(G)

    if not expand:
        rows = torch.arange(G)
        members = torch.full((G, K), -1, dtype=torch.int64)
        members[:, 0] = rows
        experts_of_rows = all_idx[g_src, g_tok]  # only for counting
        on_dst = ranks[g_src, g_tok] == dst
        counts = torch.bincount((experts_of_rows[on_dst] - dst * num_local_experts),
                                minlength=num_local_experts)
        return ReceiveLayout(
            row_index=rows, row_src_rank=g_src, row_src_token=g_tok,
            row_topk_slot=torch.full((G,), -1, dtype=torch.int64),
            row_expert=torch.full((G,), -1, dtype=torch.int64), row_group=rows,
            group_src_rank=g_src, group_src_token=g_tok, group_combine_slot=group_slot,
            group_members=members, tokens_per_expert=counts.to(torch.int32))

    p_src, p_tok, p_slot = local.nonzero(as_tuple=True)
    p_exp = all_idx[p_src, p_tok, p_slot] - dst * num_local_experts
    order = torch.argsort((p_exp * R + p_src) * M + p_tok)  # keys are unique
    p_src, p_tok, p_slot, p_exp = p_src[order], p_tok[order], p_slot[order], p_exp[order]
    counts = torch.bincount(p_exp, minlength=num_local_experts)
    aligned = (counts + alignment - 1) // alignment * alignment
    block_start = _exclusive_cumsum(aligned)
    pos_in_block = torch.arange(p_exp.numel()) - _exclusive_cumsum(counts)[p_exp]
    rows = block_start[p_exp] + pos_in_block
    p_group = token_group[p_src, p_tok]
    # members of each group in ascending row order
    by_group = torch.argsort(p_group * (int(aligned.sum()) + 1) + rows)
    sorted_group = p_group[by_group]
    first_of_group = _exclusive_cumsum(torch.bincount(sorted_group, minlength=G))
    member_pos = torch.arange(sorted_group.numel()) - first_of_group[sorted_group]
    members = torch.full((G, K), -1, dtype=torch.int64)
    members[sorted_group, member_pos] = rows[by_group]
    return ReceiveLayout(
        row_index=rows, row_src_rank=p_src, row_src_token=p_tok,
        row_topk_slot=p_slot, row_expert=p_exp, row_group=p_group,
        group_src_rank=g_src, group_src_token=g_tok, group_combine_slot=group_slot,
        group_members=members, tokens_per_expert=counts.to(torch.int32))


def build_handle(layouts: list[ReceiveLayout], all_idx: torch.Tensor, rank: int,
                 num_tokens: int, capacity: int, num_experts: int, alignment: int,
                 expand: bool, buffer_id: int) -> torch.Tensor:
    """The int32 handle of ``rank`` (layout in ``deep_ep_ops.handle``)."""
    R, M, K = all_idx.shape
    E_loc = num_experts // R
    mine = layouts[rank]
    out = torch.full((H.HEADER_ROWS + num_tokens + capacity, H.handle_width(K)), -1,
                     dtype=torch.int64)
    header = out[0]
    header.zero_()
    header[H.HDR_VALID_ROWS] = mine.row_index.numel()
    header[H.HDR_VALID_GROUPS] = mine.group_src_rank.numel()
    header[H.HDR_NUM_TOKENS] = num_tokens
    header[H.HDR_NUM_RANKS] = R
    header[H.HDR_NUM_EXPERTS] = num_experts
    header[H.HDR_MAX_TOKENS] = M
    header[H.HDR_EXPAND] = int(expand)
    header[H.HDR_ALIGNMENT] = alignment
    header[H.HDR_TOPK] = K
    header[H.HDR_BUFFER_ID] = buffer_id
    header[H.HDR_NUM_ROWS] = capacity

    # send part: where each of my (token, slot) pairs lands
    send = out[H.HEADER_ROWS: H.HEADER_ROWS + num_tokens]
    ranks = destination_ranks(all_idx[rank, :num_tokens], E_loc)  # [T, K]
    dst_row = torch.full((num_tokens, K), -1, dtype=torch.int64)
    for d, lay in enumerate(layouts):
        if expand:
            lookup = torch.full((M, K), -1, dtype=torch.int64)
            from_me = lay.row_src_rank == rank
            lookup[lay.row_src_token[from_me], lay.row_topk_slot[from_me]] = \
                lay.row_index[from_me]
            dst_row = torch.where(ranks == d, lookup[:num_tokens], dst_row)
        else:
            lookup = torch.full((M,), -1, dtype=torch.int64)
            from_me = lay.group_src_rank == rank
            lookup[lay.group_src_token[from_me]] = torch.nonzero(from_me).flatten()
            dst_row = torch.where(ranks == d, lookup[:num_tokens, None].expand(-1, K), dst_row)
    distinct = torch.zeros(num_tokens, R + 1, dtype=torch.bool)
    distinct.scatter_(1, ranks + 1, True)
    send[:, H.SEND_NUM_DST] = distinct[:, 1:].sum(-1)
    send[:, H.SEND_DST_RANK: H.SEND_DST_RANK + K] = ranks
    send[:, H.send_dst_row(K): H.send_dst_row(K) + K] = dst_row

    # receive part
    recv = out[H.HEADER_ROWS + num_tokens:]
    rows = mine.row_index
    recv[rows, H.RECV_SRC_RANK] = mine.row_src_rank
    recv[rows, H.RECV_SRC_TOKEN] = mine.row_src_token
    recv[rows, H.RECV_TOPK_SLOT] = mine.row_topk_slot
    recv[rows, H.RECV_GROUP] = mine.row_group
    G = mine.group_src_rank.numel()
    recv[:G, H.GROUP_SRC_RANK] = mine.group_src_rank
    recv[:G, H.GROUP_SRC_TOKEN] = mine.group_src_token
    recv[:G, H.GROUP_COMBINE_SLOT] = mine.group_combine_slot
    recv[:G, H.GROUP_MEMBER: H.GROUP_MEMBER + K] = mine.group_members
    return out.to(torch.int32)
