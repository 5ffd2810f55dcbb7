"""Exact-size dispatch outputs: trim the static-capacity outputs to the rows in use.

Local work only (no communication); reading the row count costs one device-to-host sync,
which is what ``exact=True`` asks for.
"""
from __future__ import annotations

import torch

from deep_ep_ops import handle as H


def rows_in_use(tokens_per_expert: torch.Tensor, handle: torch.Tensor, expand: bool) -> int:
    """Real rows of a dispatch output, alignment padding of expert-major blocks included."""
    if expand:
        A = int(handle[0, H.HDR_ALIGNMENT])
        return int(((tokens_per_expert.long() + A - 1) // A * A).sum())
    return int(handle[0, H.HDR_VALID_ROWS])


def trim_dispatch(recv_x: torch.Tensor, recv_x_scales: torch.Tensor,
                  recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor,
                  tokens_per_expert: torch.Tensor, handle: torch.Tensor):
    """The first ``rows_in_use`` rows of each per-row output; the handle keeps its header (with
    the new row count), send part (and, on several hosts, virtual part) and loses the unused
    receive rows (groups never outnumber rows in use). The receive part is the handle's last C
    rows on any number of hosts, so no host count is needed here."""
    n = rows_in_use(tokens_per_expert, handle, recv_topk_idx.dim() == 1)
    head = handle.shape[0] - recv_x.shape[0]
    trimmed = torch.cat([handle[:head], handle[head: head + n]])
    trimmed[0, H.HDR_NUM_ROWS] = n  # the rows this (exact) dispatch now returns
    trimmed[0, H.HDR_EXACT] = 1  # later ops on several hosts use the exact wire
    return (recv_x[:n].clone(), recv_x_scales[:n].clone(), recv_topk_idx[:n].clone(),
            recv_topk_weights[:n].clone(), tokens_per_expert.clone(), trimmed)
