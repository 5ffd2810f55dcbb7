"""``ExpertParallelMoE``: dispatch -> this rank's experts -> combine, autograd-aware.

The module takes the router's decision (top-k ids and weights) as inputs, so any router works
and its gradient flows through ``topk_weights``. Static capacity (the default) has no host
sync, so a whole step can be captured in a CUDA graph; ``exact=True`` trims outputs to the real
row count (host sync).

Experts are either stacked weights (``LocalExperts``: SwiGLU ``[E_loc, H, F]``;
``StackedGLUExperts``: the fused ``gate_up_proj``/``down_proj`` layout of Hugging Face MoE
models) or an ``nn.ModuleList`` of arbitrary modules mapping ``[N, H] -> [N, H]``.

How the expert-major rows are computed (``expert_impl``):
  * ``"grouped"``: one ``torch._grouped_mm`` per projection over the aligned expert blocks,
    offsets computed on device from ``tokens_per_expert`` (CUDA, bf16, stacked experts).
  * ``"loop"``: per local expert, a fixed-size window of ``R*M`` rows starting at the expert's
    block (start computed on device) is gathered, run and scattered back; rows past the
    expert's count are masked. Shapes never depend on data: no host sync.
  * ``"masked"``: every expert runs over every row and a mask keeps its own (the fallback;
    E_loc times the FLOPs). The compact layout always works this way.
``"auto"`` picks ``grouped`` where it can run, else ``loop`` (expert-major) / ``masked``.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deep_ep_ops.buffer import Buffer

Layout = Literal["compact", "expert_major"]
ExpertImpl = Literal["auto", "grouped", "loop", "masked"]

FP8_BLOCK = 128          # channels per FP8 scale
FP8_MAX = 448.0          # largest finite float8_e4m3fn


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` (H divisible by 128) -> ``(float8_e4m3fn [T, H], fp32 scales [T, H/128])``
    with ``x ~= q * scale`` per 128-channel block. Pure tensor ops: no host sync."""
    T, H = x.shape
    if H % FP8_BLOCK != 0:
        raise ValueError(f"FP8 dispatch: hidden={H} must be divisible by {FP8_BLOCK}")
    blocks = x.float().reshape(T, H // FP8_BLOCK, FP8_BLOCK)
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-10) / FP8_MAX
    q = (blocks / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(T, H), scales.contiguous()


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_fp8``: ``q [C, H]`` float8, ``scales [C, H/128]`` -> ``[C, H]``."""
    C, H = q.shape
    rows = q.float().reshape(C, H // FP8_BLOCK, FP8_BLOCK) * scales.float().unsqueeze(-1)
    return rows.reshape(C, H).to(dtype)


class _DequantizeReceived(torch.autograd.Function):
    """Received FP8 rows -> ``dtype`` rows. The FP8 dispatch itself is not differentiable;
    this gives ``x`` the gradient the high-precision dispatch would have given it: the
    combine (sum over copies) of the rows' gradients."""

    @staticmethod
    def forward(ctx, x, q, scales, handle, group_name):
        ctx.save_for_backward(handle)
        ctx.group_name = group_name
        return dequantize_fp8(q, scales, x.dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        (handle,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.deep_ep.combine(grad_rows.contiguous(), handle, None,
                                               ctx.group_name)
        return grad_x, None, None, None, None


def aligned_block_ends(tokens_per_expert: torch.Tensor, alignment: int) -> torch.Tensor:
    """End row of each expert's block in the expert-major layout (int32, on device):
    ``cumsum(align(tokens_per_expert, alignment))`` - the ``offs`` of a grouped matmul."""
    counts = tokens_per_expert.to(torch.int32)
    blocks = (counts + (alignment - 1)) // alignment * alignment
    return torch.cumsum(blocks, dim=0, dtype=torch.int32)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` can run the stacked experts: CUDA sm80+, bf16, row
    widths giving 16-byte aligned strides."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if any(w % 8 != 0 for w in widths):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


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

    def grouped_mm_ok(self) -> bool:
        return grouped_mm_supported(self.w_gate.device, self.w_gate.dtype,
                                    self.w_gate.shape[1], self.w_gate.shape[2])

    def expert(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert ``j`` on ``rows [N, H]``."""
        return (F.silu(rows @ self.w_gate[j]) * (rows @ self.w_up[j])) @ self.w_down[j]

    def grouped(self, rows: torch.Tensor, block_ends: torch.Tensor) -> torch.Tensor:
        """All experts over the expert-major ``rows`` in three grouped matmuls. Rows past
        ``block_ends[-1]`` come out unspecified (the caller masks them)."""
        gate = torch._grouped_mm(rows, self.w_gate, offs=block_ends)
        up = torch._grouped_mm(rows, self.w_up, offs=block_ends)
        return torch._grouped_mm(F.silu(gate) * up, self.w_down, offs=block_ends)

    def forward(self, rows: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """Apply to each row the expert ``expert_of_row[row]`` (-1: zero row), masked."""
        return masked_experts(self, rows, expert_of_row)


class StackedGLUExperts(nn.Module):
    """Experts in the fused layout of Hugging Face MoE models (transformers 5.x):
    ``gate_up_proj [E_loc, 2F, H]``, ``down_proj [E_loc, H, F]``, ``act_fn``; expert ``j`` is
    ``down(act(gate) * up)`` with ``gate, up = linear(x, gate_up_proj[j]).chunk(2)``."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)
        self.down_proj = nn.Parameter(down_proj)
        self.act_fn = act_fn

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def grouped_mm_ok(self) -> bool:
        return grouped_mm_supported(self.gate_up_proj.device, self.gate_up_proj.dtype,
                                    self.gate_up_proj.shape[1], self.gate_up_proj.shape[2])

    def expert(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, self.gate_up_proj[j]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[j])

    def grouped(self, rows: torch.Tensor, block_ends: torch.Tensor) -> torch.Tensor:
        gate_up = torch._grouped_mm(rows, self.gate_up_proj.transpose(-2, -1), offs=block_ends)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch._grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(-2, -1),
                                 offs=block_ends)

    def forward(self, rows: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        return masked_experts(self, rows, expert_of_row)


def num_local_experts(experts: nn.Module) -> int:
    return len(experts) if isinstance(experts, nn.ModuleList) else experts.num_local_experts


def run_expert(experts: nn.Module, j: int, rows: torch.Tensor) -> torch.Tensor:
    """Expert ``j`` of a stacked container or of an ``nn.ModuleList``, on ``rows [N, H]``."""
    if isinstance(experts, nn.ModuleList):
        return experts[j](rows)
    return experts.expert(j, rows)


def masked_experts(experts: nn.Module, rows: torch.Tensor,
                   expert_of_row: torch.Tensor) -> torch.Tensor:
    """Every expert over all rows, each row keeping its own expert's output (-1: zero).
    Static shapes at E_loc times the FLOPs of a grouped GEMM."""
    out = None
    for j in range(num_local_experts(experts)):
        y = run_expert(experts, j, rows)
        y = torch.where((expert_of_row == j).unsqueeze(-1), y, torch.zeros_like(y))
        out = y if out is None else out + y
    return out


def windowed_experts(experts: nn.Module, rows: torch.Tensor, tokens_per_expert: torch.Tensor,
                     alignment: int, window: int) -> torch.Tensor:
    """Expert-major rows through their experts, one fixed-size window per expert.

    Expert ``j``'s rows are ``[start_j, start_j + tokens_per_expert[j])`` with ``start_j`` the
    aligned block start. A window of ``window`` (>= the most rows one expert can receive) row
    indices from ``start_j`` is gathered (indices past the count point at an appended zero
    row), run, masked and added back. No shape depends on the routing.
    """
    C, H = rows.shape
    padded = torch.cat([rows, rows.new_zeros(1, H)])
    counts = tokens_per_expert.to(torch.int64)
    ends = aligned_block_ends(tokens_per_expert, alignment).to(torch.int64)
    starts = ends - (counts + (alignment - 1)) // alignment * alignment
    ar = torch.arange(window, device=rows.device)
    zero_row = torch.full_like(ar, C)
    out = None
    for j in range(num_local_experts(experts)):
        take = ar < counts[j]
        index = torch.where(take, starts[j] + ar, zero_row)
        y = run_expert(experts, j, padded.index_select(0, index))
        y = torch.where(take.unsqueeze(-1), y, torch.zeros_like(y))
        if out is None:
            out = y.new_zeros(C + 1, y.shape[1])
        out = out.index_add(0, index, y)
    return out[:C]


class ExpertParallelMoE(nn.Module):
    """Expert-parallel MoE over the ranks of ``buffer``'s group.

    forward(x [T, H], topk_idx [T, K] int64 global ids (-1 = none), topk_weights [T, K])
    -> [T, H]: sum_k topk_weights[t, k] * expert_{topk_idx[t, k]}(x[t]).

    Args:
        buffer: the Buffer of the expert-parallel group (its R, M, H, K, E are used).
        ffn_hidden: intermediate width of each expert (for the default ``LocalExperts``).
        layout: "expert_major" (rows grouped per expert, weights applied by combine) or
            "compact" (one row per token and rank, weights folded in before combine).
        exact: trim dispatch outputs to the real row count (host sync) instead of the static
            worst case.
        expert_alignment: block alignment A of the expert-major layout.
        experts: this rank's ``E/R`` experts: ``LocalExperts``, ``StackedGLUExperts`` or an
            ``nn.ModuleList`` of modules ``[N, H] -> [N, H]`` (local expert j = global expert
            ``rank * E/R + j``). Default: a fresh ``LocalExperts``.
        expert_impl: "auto", "grouped", "loop" or "masked" (module docstring).
        fp8: dispatch FP8 rows (float8_e4m3fn, fp32 scales per 128 channels) and dequantize
            them before the experts; CUDA only, needs ``Buffer(fp8_dispatch=True)``.
    """

    def __init__(self, buffer: Buffer, ffn_hidden: Optional[int] = None,
                 layout: Layout = "expert_major", exact: bool = False,
                 expert_alignment: int = 1, dtype: torch.dtype = torch.float32, device=None,
                 experts: Optional[nn.Module] = None, expert_impl: ExpertImpl = "auto",
                 fp8: bool = False) -> None:
        super().__init__()
        if layout not in ("compact", "expert_major"):
            raise ValueError(f"layout must be 'compact' or 'expert_major', got {layout!r}")
        if expert_impl not in ("auto", "grouped", "loop", "masked"):
            raise ValueError("expert_impl must be 'auto', 'grouped', 'loop' or 'masked', got "
                             f"{expert_impl!r}")
        if experts is None:
            if ffn_hidden is None:
                raise ValueError("ExpertParallelMoE: give ffn_hidden or experts")
            experts = LocalExperts(buffer.num_local_experts, buffer.hidden, ffn_hidden, dtype,
                                   device)
        if num_local_experts(experts) != buffer.num_local_experts:
            raise ValueError(f"ExpertParallelMoE: experts holds {num_local_experts(experts)} "
                             f"experts; this rank owns E/R = {buffer.num_local_experts}")
        if fp8:
            if buffer.device.type != "cuda":
                raise ValueError("ExpertParallelMoE(fp8=True): FP8 dispatch needs CUDA tensors "
                                 f"on an NCCL group; group {buffer.group_name!r} is "
                                 f"{buffer.backend} (CPU). Use fp8=False on CPU")
            if not buffer.fp8_dispatch:
                raise ValueError("ExpertParallelMoE(fp8=True): create the Buffer with "
                                 "fp8_dispatch=True")
            if buffer.hidden % FP8_BLOCK != 0:
                raise ValueError(f"ExpertParallelMoE(fp8=True): hidden={buffer.hidden} must "
                                 f"be divisible by {FP8_BLOCK}")
        self.group_name = buffer.group_name
        self.num_experts = buffer.num_experts
        self.layout = layout
        self.exact = exact
        self.expert_alignment = expert_alignment
        self.fp8 = fp8
        self.window = buffer.world_size * buffer.num_max_tokens_per_rank
        self.experts = experts
        for p in self.experts.parameters():
            p._deep_ep_expert = True  # sharded: not all-reduced with the replicated params
        can_group = hasattr(experts, "grouped") and experts.grouped_mm_ok()
        if expert_impl == "grouped" and not (can_group and layout == "expert_major"):
            raise ValueError("expert_impl='grouped' needs the expert_major layout and stacked "
                             "bf16 experts on CUDA (sm80+) with torch._grouped_mm")
        if expert_impl == "loop" and layout != "expert_major":
            raise ValueError("expert_impl='loop' needs the expert_major layout")
        if expert_impl == "auto":
            if layout == "compact":
                expert_impl = "masked"
            else:
                expert_impl = "grouped" if can_group else "loop"
        self.expert_impl = expert_impl

    def _dispatch(self, x, topk_idx, topk_weights, expand):
        if not self.fp8:
            return torch.ops.deep_ep.dispatch(
                x, None, topk_idx, topk_weights, self.group_name, self.num_experts,
                self.expert_alignment, expand, self.exact)
        if not x.is_cuda:
            raise ValueError("ExpertParallelMoE(fp8=True): FP8 dispatch is CUDA only; got x on "
                             f"{x.device}")
        q, scales = quantize_fp8(x.detach())
        recv_q, recv_s, recv_idx, recv_w, tpe, handle = torch.ops.deep_ep.dispatch(
            q, scales, topk_idx, topk_weights, self.group_name, self.num_experts,
            self.expert_alignment, expand, self.exact)
        recv_x = _DequantizeReceived.apply(x, recv_q, recv_s, handle, self.group_name)
        return recv_x, None, recv_idx, recv_w, tpe, handle

    def _expert_major(self, rows, expert_of_row, tokens_per_expert):
        valid = (expert_of_row >= 0).unsqueeze(-1)
        # padding rows may hold anything (static capacity): zero them so no NaN reaches a
        # weight gradient, and mask the outputs the grouped kernel leaves unwritten
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        if self.expert_impl == "grouped":
            ends = aligned_block_ends(tokens_per_expert, self.expert_alignment)
            y = self.experts.grouped(rows, ends)
        elif self.expert_impl == "loop":
            y = windowed_experts(self.experts, rows, tokens_per_expert, self.expert_alignment,
                                 self.window)
        else:
            y = masked_experts(self.experts, rows, expert_of_row)
        return torch.where(valid, y, torch.zeros_like(y))

    def _compact(self, rows, recv_idx, recv_w):
        valid = (recv_idx >= 0).any(-1, keepdim=True)
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        acc = None
        for j in range(num_local_experts(self.experts)):
            w_j = torch.where(recv_idx == j, recv_w, torch.zeros_like(recv_w)).sum(-1)
            y = run_expert(self.experts, j, rows).float() * w_j.float().unsqueeze(-1)
            acc = y if acc is None else acc + y
        return acc.to(rows.dtype)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        expand = self.layout == "expert_major"
        recv_x, _, recv_idx, recv_w, tpe, handle = self._dispatch(x, topk_idx, topk_weights,
                                                                  expand)
        if expand:
            y = self._expert_major(recv_x, recv_idx, tpe)
            return torch.ops.deep_ep.combine(y.contiguous(), handle, recv_w, self.group_name)
        y = self._compact(recv_x, recv_idx, recv_w)
        return torch.ops.deep_ep.combine(y.contiguous(), handle, None, self.group_name)


def is_expert_parameter(p: torch.Tensor) -> bool:
    """True for parameters of an ``ExpertParallelMoE``'s (sharded) experts."""
    return getattr(p, "_deep_ep_expert", False)


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
