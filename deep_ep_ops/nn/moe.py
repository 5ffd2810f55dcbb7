"""``ExpertParallelMoE``: dispatch -> this rank's experts -> combine, autograd-aware.

The module takes the router's decision (top-k ids and weights) as inputs, so any router works
and its gradient flows through ``topk_weights``. Static capacity (the default) has no host
sync, so a whole step can be captured in a CUDA graph; ``exact=True`` trims outputs to the real
row count (host sync).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from deep_ep_ops.buffer import Buffer

Layout = Literal["compact", "expert_major"]

class LocalExperts(nn.Module):
    """This rank's experts as stacked SwiGLU weights: ``w_gate, w_up [E_loc, H, F]``,
    ``w_down [E_loc, F, H]``."""

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        scale_in, scale_out = 1 / math.sqrt(hidden), 1 / math.sqrt(ffn_hidden)
        kw = dict(dtype=dtype, device=device)
        self.w_gate = nn.Parameter(torch.randn(num_local_experts, hidden, ffn_hidden, **kw)
                                   * scale_in)
        self.w_up = nn.Parameter(torch.randn(num_local_experts, hidden, ffn_hidden, **kw)
                                 * scale_in)
        self.w_down = nn.Parameter(torch.randn(num_local_experts, ffn_hidden, hidden, **kw)
                                   * scale_out)

    @property
    def num_local_experts(self) -> int:
        return self.w_gate.shape[0]

    def expert(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert ``j`` on ``rows [N, H]``."""
        return (F.silu(rows @ self.w_gate[j]) * (rows @ self.w_up[j])) @ self.w_down[j]

    def forward(self, rows: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Apply to each row the expert ``expert_of_row[row]`` (-1: zero row).

        Every expert runs over all rows and a mask keeps its own: shapes stay static (no host
        sync, graph-capturable) at E_loc times the FLOPs of a grouped GEMM. Fine for tests and
        small decode batches; large prefill wants a grouped GEMM over the expert-major blocks.
        """
        out = rows.new_zeros(rows.shape[0], self.w_down.shape[2])
        for j in range(self.num_local_experts):
            mask = (expert_of_row == j).unsqueeze(-1)
            out = out + torch.where(mask, self.expert(j, rows), torch.zeros_like(out))
        return out

class ExpertParallelMoE(nn.Module):
    """Expert-parallel MoE over the ranks of ``buffer``'s group.

    forward(x [T, H], topk_idx [T, K] int64 global ids (-1 = none), topk_weights [T, K])
    -> [T, H]: sum_k topk_weights[t, k] * expert_{topk_idx[t, k]}(x[t]).

    Args:
        buffer: the Buffer of the expert-parallel group (its R, M, H, K, E are used).
        ffn_hidden: intermediate width of each expert.
        layout: "expert_major" (rows grouped per expert, weights applied by combine) or
            "compact" (one row per token and rank, weights folded in before combine).
        exact: trim dispatch outputs to the real row count (host sync) instead of the static
            worst case.
    """

    def __init__(self, buffer: Buffer, ffn_hidden: int, layout: Layout = "expert_major",
                 exact: bool = False, expert_alignment: int = 1,
                 dtype: torch.dtype = torch.float32, device=None,
                 experts: LocalExperts | None = None) -> None:
        super().__init__()
        if layout not in ("compact", "expert_major"):
            raise ValueError(f"layout must be 'compact' or 'expert_major', got {layout!r}")
        self.group_name = buffer.group_name
        self.num_experts = buffer.num_experts
        self.layout = layout
        self.exact = exact
        self.expert_alignment = expert_alignment
        self.experts = experts if experts is not None else LocalExperts(
            buffer.num_local_experts, buffer.hidden, ffn_hidden, dtype, device)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        expand = self.layout == "expert_major"
        recv_x, _, recv_idx, recv_w, _, handle = torch.ops.deep_ep.dispatch(
            x, None, topk_idx, topk_weights, self.group_name, self.num_experts,
            self.expert_alignment, expand, self.exact)
        if expand:
            y = self.experts(recv_x, recv_idx)
            return torch.ops.deep_ep.combine(y, handle, recv_w, self.group_name)
        y = recv_x.new_zeros(recv_x.shape)
        for k in range(recv_idx.shape[1]):
            yk = self.experts(recv_x, recv_idx[:, k])
            y = y + yk * recv_w[:, k:k + 1].to(yk.dtype)
        return torch.ops.deep_ep.combine(y, handle, None, self.group_name)

class TopKRouter(nn.Module):
    """Softmax-then-top-k router: ``x [T, H] -> (topk_idx [T, K] int64, topk_weights [T, K])``."""

    def __init__(self, hidden: int, num_experts: int, top_k: int,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        return idx, weights
