"""One shape function per op: the fake impls and every real backend call these.

Sizes may be SymInts (fake tensors under torch.compile / export): only arithmetic, never int().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from deep_ep_ops.handle import HEADER_ROWS, handle_width

Size = Union[int, torch.SymInt]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums run in (combine, reduce-scatter, Engram gradients): fp32 for every float type
    but fp64, which keeps fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def align_up(value, alignment: int):
    """Round ``value`` up to a multiple of ``alignment`` (works on SymInts)."""
    return (value + alignment - 1) // alignment * alignment


def static_capacity(num_ranks: int, max_tokens: int, num_topk: int, num_local_experts: int,
                    alignment: int, expand: bool) -> int:
    """Worst-case received rows of a dispatch (``exact=False``).

    compact: ``R*M``; expert-major: ``align(R*M*min(K, E_loc) + (A-1)*E_loc, A)``.
    """
    if not expand:
        return num_ranks * max_tokens
    pairs = num_ranks * max_tokens * min(num_topk, num_local_experts)
    return align_up(pairs + (alignment - 1) * num_local_experts, alignment)


def virtual_tokens(num_hosts: int, max_tokens: int) -> int:
    """V, the virtual-token rows of a handle: 0 on one host (the handle is ``[1 + T + C, W]``
    as it always was); on ``N > 1`` hosts ``N*M``, one slot per (source host, rail row) of the
    intra-host stage (deep_ep_ops.handle, "Several hosts")."""
    return 0 if num_hosts == 1 else num_hosts * max_tokens


def buffer_num_hosts(buf) -> int:
    """Hosts of ``buf``'s group (a stand-in Buffer without a host layout: one)."""
    hosts = getattr(buf, "hosts", None)
    return hosts.num_hosts if hosts is not None else 1


def buffer_virtual_tokens(buf) -> int:
    """V of a Buffer's handles (its host count and M)."""
    return virtual_tokens(buffer_num_hosts(buf), buf.num_max_tokens_per_rank)


def handle_rows(num_tokens: Size, num_virtual: int, num_rows: Size) -> Size:
    """Rows of a handle: header, T send rows, V virtual rows, C receive rows."""
    return HEADER_ROWS + num_tokens + num_virtual + num_rows


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype


def dispatch_specs(num_tokens: Size, hidden: Size, x_dtype: torch.dtype, num_topk: int,
                   num_scale_packs: Size, scales_dtype: Optional[torch.dtype],
                   weights_dtype: torch.dtype, num_local_experts: int, expand: bool,
                   capacity: Size, num_virtual: int = 0) -> tuple[TensorSpec, ...]:
    """Output specs of ``dispatch`` in schema order:
    ``(recv_x [C,H], recv_x_scales [C,P], recv_topk_idx, recv_topk_weights,
    tokens_per_expert [E_loc] int32, handle [1+T+V+C, W] int32)`` (V: ``virtual_tokens``).

    recv_topk_idx / recv_topk_weights: compact ``[C,K]`` int64 / weights dtype;
    expert-major ``[C]`` int32 / weights dtype. Without scales, recv_x_scales is ``[C,0]`` fp32.
    """
    C = capacity
    recv_x = TensorSpec((C, hidden), x_dtype)
    recv_scales = TensorSpec((C, num_scale_packs), scales_dtype or torch.float32)
    if expand:
        recv_idx = TensorSpec((C,), torch.int32)
        recv_w = TensorSpec((C,), weights_dtype)
    else:
        recv_idx = TensorSpec((C, num_topk), torch.int64)
        recv_w = TensorSpec((C, num_topk), weights_dtype)
    tpe = TensorSpec((num_local_experts,), torch.int32)
    handle = TensorSpec((handle_rows(num_tokens, num_virtual, C), handle_width(num_topk)),
                        torch.int32)
    return recv_x, recv_scales, recv_idx, recv_w, tpe, handle


def tokens_from_handle(num_handle_rows: Size, num_rows: Size, num_virtual: int = 0) -> Size:
    """T of the dispatch that made a handle, from its row count, the dispatch's C and V."""
    return num_handle_rows - HEADER_ROWS - num_virtual - num_rows


def cached_dispatch_specs(x_shape: Sequence[Size], x_dtype: torch.dtype,
                          scales_shape: Optional[Sequence[Size]],
                          scales_dtype: Optional[torch.dtype],
                          num_handle_rows: Size,
                          num_virtual: int = 0) -> tuple[TensorSpec, TensorSpec]:
    """``(recv_x [C,H], recv_x_scales [C,P])`` with ``C = handle_rows - 1 - T - V``."""
    T, H = x_shape
    C = num_handle_rows - HEADER_ROWS - num_virtual - T
    P = scales_shape[1] if scales_shape is not None else 0
    return TensorSpec((C, H), x_dtype), TensorSpec((C, P), scales_dtype or torch.float32)


def combine_spec(x_shape: Sequence[Size], x_dtype: torch.dtype, num_handle_rows: Size,
                 num_virtual: int = 0) -> TensorSpec:
    """``out [T, H]`` in x's dtype with ``T = handle_rows - 1 - V - C``."""
    C, H = x_shape
    return TensorSpec((tokens_from_handle(num_handle_rows, C, num_virtual), H), x_dtype)


def engram_fetch_spec(indices_shape: Sequence[Size], hidden: Size,
                      dtype: torch.dtype) -> TensorSpec:
    """``[N, L*H]`` in the table's dtype."""
    N, L = indices_shape
    return TensorSpec((N, L * hidden), dtype)


def engram_grad_spec(num_entries: Size, hidden: Size, dtype: torch.dtype) -> TensorSpec:
    """Gradient of this rank's table shard: ``[n, H]``."""
    return TensorSpec((num_entries, hidden), dtype)


def pp_recv_spec(src: int, recv_shape: Sequence[Size], recv_dtype: torch.dtype) -> TensorSpec:
    """``recv_shape`` or ``[0]`` when ``src == -1``."""
    return TensorSpec(tuple(recv_shape) if src >= 0 else (0,), recv_dtype)


def cp_all_gather_spec(x_shape: Sequence[Size], dtype: torch.dtype, num_ranks: int) -> TensorSpec:
    return TensorSpec((num_ranks * x_shape[0], *x_shape[1:]), dtype)


def cp_reduce_scatter_spec(x_shape: Sequence[Size], dtype: torch.dtype,
                           num_ranks: int) -> TensorSpec:
    return TensorSpec((x_shape[0] // num_ranks, *x_shape[1:]), dtype)
