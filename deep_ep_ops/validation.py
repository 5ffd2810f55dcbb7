"""Input checks shared by the fake impls and every backend.

Shape and dtype checks run everywhere (fake tensors included, so a bad call fails at trace
time). Value checks (expert ids in range, no duplicate in a row, indices in range) read data:
they always run on CPU tensors, and on CUDA tensors only when ``DEEP_EP_OPS_VALIDATE=1`` and no
graph is being captured, because they cost a device-to-host sync.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.handle import HEADER_ROWS, handle_width

if TYPE_CHECKING:
    from deep_ep_ops.buffer import Buffer

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)
INDEX_DTYPES = (torch.int32, torch.int64)
SCALE_DTYPES = (torch.float32, torch.int32)


def _fail(op: str, arg: str, expected: str, got: str) -> None:
    raise ValueError(f"deep_ep.{op}: {arg} must be {expected}; got {got}")


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {t.dtype} on {t.device}"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type == "meta" or is_fake(t)


def wants_value_checks(t: torch.Tensor) -> bool:
    # Cheapest test first: this runs on every eager CUDA call (the host-overhead budget).
    if t.is_cuda and os.environ.get("DEEP_EP_OPS_VALIDATE", "0") != "1":
        return False
    if _is_fake(t):
        return False
    if t.is_cpu:
        return True
    return not torch.cuda.is_current_stream_capturing()


def check_device(op: str, buf: Buffer, **tensors: Optional[torch.Tensor]) -> None:
    # Fake tensors carry the device they stand for, so they are checked too; only meta
    # tensors (no device) are skipped. Flags, not torch.device objects: this runs on every
    # eager call (is_fake cost ~1 us a tensor, building t.device ~0.7 us).
    want_cuda = buf.device.type == "cuda"
    for name, t in tensors.items():
        if t is None or t.is_meta:
            continue
        if t.is_cuda != want_cuda:
            _fail(op, name, f"on {buf.device.type} (group {buf.group_name!r} is "
                  f"{buf.backend})", _desc(t))


def check_contiguous(op: str, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            _fail(op, name, "contiguous", f"strides {t.stride()}")


def check_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                   topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                   expert_alignment: int, num_sms: int) -> None:
    op = "dispatch"
    if x.dim() != 2:
        _fail(op, "x", "2-D [T, H]", _desc(x))
    T, H = x.shape
    fp8 = x.dtype in FP8_DTYPES
    if x.dtype not in FLOAT_DTYPES + FP8_DTYPES:
        _fail(op, "x", "a float dtype (bf16/fp16/fp32/fp64) or float8_e4m3fn", _desc(x))
    if H != buf.hidden:
        _fail(op, "x", f"[T, {buf.hidden}] (hidden of the Buffer for {buf.group_name!r})",
              _desc(x))
    if T > buf.num_max_tokens_per_rank:
        _fail(op, "x", f"at most num_max_tokens_per_rank={buf.num_max_tokens_per_rank} rows",
              _desc(x))
    if fp8:
        if x_scales is None:
            _fail(op, "x_scales", "a [T, P] float32/int32 tensor when x is float8_e4m3fn",
                  "None")
    if x_scales is not None:
        if not fp8:
            _fail(op, "x_scales", "None unless x is float8_e4m3fn", _desc(x_scales))
        if x_scales.dim() != 2 or x_scales.shape[0] != T or x_scales.dtype not in SCALE_DTYPES:
            _fail(op, "x_scales", f"[{T}, P] float32 or int32 (4-byte scale packs)",
                  _desc(x_scales))
        if x_scales.shape[1] > (H + 31) // 32:
            _fail(op, "x_scales", f"at most ceil(H/32)={(H + 31) // 32} packs per row",
                  _desc(x_scales))
    K = buf.num_topk
    if topk_idx.dim() != 2 or topk_idx.shape[0] != T or topk_idx.shape[1] != K or \
            topk_idx.dtype not in INDEX_DTYPES:
        _fail(op, "topk_idx", f"[{T}, {K}] int64 or int32 (K = num_topk of the Buffer)",
              _desc(topk_idx))
    if topk_weights.dim() != 2 or tuple(topk_weights.shape) != (T, K) or \
            topk_weights.dtype not in FLOAT_DTYPES:
        _fail(op, "topk_weights", f"[{T}, {K}] float32", _desc(topk_weights))
    if num_experts != buf.num_experts:
        _fail(op, "num_experts", f"{buf.num_experts} (num_experts of the Buffer)",
              str(num_experts))
    if not isinstance(expert_alignment, int) or expert_alignment < 1:
        _fail(op, "expert_alignment", "an int >= 1", repr(expert_alignment))
    if num_sms < 0:
        _fail(op, "num_sms", ">= 0 (0 = automatic)", str(num_sms))
    check_device(op, buf, x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights)
    check_contiguous(op, x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights)
    if wants_value_checks(topk_idx) and topk_idx.numel() > 0:
        check_expert_ids(topk_idx, num_experts)


def check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        _fail("dispatch", "topk_idx", f"expert ids in [-1, {num_experts})",
              f"topk_idx[{t}, {k}] = {int(topk_idx[t, k])}")
    ids = topk_idx.to(torch.int64)
    srt = ids.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        t = int(dup.nonzero()[0, 0])
        _fail("dispatch", "topk_idx", "free of duplicate expert ids within a row",
              f"row {t} = {topk_idx[t].tolist()}")


def check_handle(op: str, buf: Buffer, handle: torch.Tensor) -> None:
    width = handle_width(buf.num_topk)
    if handle.dim() != 2 or handle.shape[1] != width or handle.dtype != torch.int32 or \
            handle.shape[0] < HEADER_ROWS:
        _fail(op, "handle", f"the int32 [1 + T + C, {width}] handle returned by dispatch on "
              f"group {buf.group_name!r}", _desc(handle))


def check_cached_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                          handle: torch.Tensor, num_sms: int) -> None:
    op = "cached_dispatch"
    check_handle(op, buf, handle)
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES + FP8_DTYPES:
        _fail(op, "x", "a 2-D [T, H] float or float8_e4m3fn tensor", _desc(x))
    if x.shape[1] > buf.hidden:
        _fail(op, "x", f"[T, <= {buf.hidden}] (hidden of the Buffer)", _desc(x))
    if x.shape[0] > handle.shape[0] - HEADER_ROWS:
        _fail(op, "x", f"[T, H] with T of the dispatch that made handle ({handle.shape[0]} "
              "rows)", _desc(x))
    if (x.dtype in FP8_DTYPES) != (x_scales is not None):
        _fail(op, "x_scales", "given exactly when x is float8_e4m3fn",
              "None" if x_scales is None else _desc(x_scales))
    if x_scales is not None and (x_scales.dim() != 2 or x_scales.shape[0] != x.shape[0] or
                                 x_scales.dtype not in SCALE_DTYPES):
        _fail(op, "x_scales", f"[{x.shape[0]}, P] float32 or int32", _desc(x_scales))
    if num_sms < 0:
        _fail(op, "num_sms", ">= 0 (0 = automatic)", str(num_sms))
    check_device(op, buf, x=x, x_scales=x_scales, handle=handle)
    check_contiguous(op, x=x, x_scales=x_scales, handle=handle)
    if wants_value_checks(handle):
        check_handle_header(op, buf, handle, x.shape[0])


def check_combine(buf: Buffer, x: torch.Tensor, handle: torch.Tensor,
                  weights: Optional[torch.Tensor], num_sms: int) -> None:
    op = "combine"
    check_handle(op, buf, handle)
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        _fail(op, "x", "a 2-D [C, H] float tensor (the rows of dispatch's output)", _desc(x))
    if x.shape[1] > buf.hidden:
        _fail(op, "x", f"[C, <= {buf.hidden}] (hidden of the Buffer)", _desc(x))
    if x.shape[0] > handle.shape[0] - HEADER_ROWS:
        _fail(op, "x", f"[C, H] with C rows of the dispatch that made handle "
              f"({handle.shape[0]} handle rows)", _desc(x))
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != x.shape[0] or
                                weights.dtype not in FLOAT_DTYPES):
        _fail(op, "weights", f"None or [{x.shape[0]}] float32 (one weight per row)",
              _desc(weights))
    if num_sms < 0:
        _fail(op, "num_sms", ">= 0 (0 = automatic)", str(num_sms))
    check_device(op, buf, x=x, handle=handle, weights=weights)
    check_contiguous(op, x=x, handle=handle, weights=weights)
    if wants_value_checks(handle):
        check_handle_header(op, buf, handle, x.shape[0])


def check_handle_header(op: str, buf: Buffer, handle: torch.Tensor, x_rows: int) -> None:
    """Value checks of a handle's header row (they read it: free on CPU; on CUDA a host sync,
    so only with DEEP_EP_OPS_VALIDATE=1): the handle was made on this Buffer, and x has the rows
    its dispatch implies (cached_dispatch: that dispatch's T tokens; combine: its C rows). The
    C++ CUDA kernels raise the same messages (csrc/torch/handle_checks.cpp), for the handles
    their dispatch returned on every call, from a host-side record instead of the header.

    A handle of the same Buffer and shape (two static-capacity dispatches of one Buffer return
    the same C whatever T) cannot be told apart from the right one."""
    header = handle[0].tolist()
    made_on = header[H.HDR_BUFFER_ID]
    if made_on != buf.id:
        raise ValueError(
            f"deep_ep.{op}: handle belongs to another Buffer: it was made by a dispatch on "
            f"Buffer #{made_on}, and group {buf.group_name!r} has Buffer #{buf.id} (a handle of "
            "another group, or of a Buffer destroyed since)")
    if header[H.HDR_NUM_RANKS] != buf.world_size or header[H.HDR_TOPK] != buf.num_topk:
        raise ValueError(
            f"deep_ep.{op}: handle does not match the Buffer: it was made for R="
            f"{header[H.HDR_NUM_RANKS]} ranks and K={header[H.HDR_TOPK]}, the Buffer has "
            f"R={buf.world_size}, K={buf.num_topk}")
    if op == "combine":
        want, made = header[H.HDR_NUM_ROWS], f"produced {header[H.HDR_NUM_ROWS]}"
    else:
        want, made = header[H.HDR_NUM_TOKENS], f"had {header[H.HDR_NUM_TOKENS]} tokens"
    if x_rows != want:
        raise ValueError(f"deep_ep.{op}: x has {x_rows} rows, the handle's dispatch {made}")


def check_engram_fetch(buf: Buffer, table: torch.Tensor, indices: torch.Tensor) -> None:
    op = "engram_fetch"
    if table.dim() != 2:
        _fail(op, "table", "the 2-D [n, H] shard from buf.engram_table()", _desc(table))
    if indices.dim() != 2 or indices.dtype not in INDEX_DTYPES:
        _fail(op, "indices", "[N, L] int32 or int64 global row ids", _desc(indices))
    check_device(op, buf, table=table, indices=indices)
    if not _is_fake(table):
        buf.check_engram_table(table)
    if wants_value_checks(indices) and indices.numel() > 0:
        limit = buf.world_size * table.shape[0]
        bad = (indices < -1) | (indices >= limit)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            _fail(op, "indices", f"row ids in [-1, R*n = {limit})",
                  f"indices[{row}, {col}] = {int(indices[row, col])}")


def check_pp(buf: Buffer, send: torch.Tensor, dst: int, src: int, recv_shape,
             recv_dtype: torch.dtype) -> None:
    op = "pp_send_recv"
    R = buf.world_size
    for name, peer in (("dst", dst), ("src", src)):
        if not -1 <= peer < R:
            _fail(op, name, f"a rank in [0, {R}) or -1 (none)", str(peer))
    if dst == -1 and src == -1:
        _fail(op, "dst/src", "at least one peer (both are -1)", "dst=-1, src=-1")
    if src >= 0 and any(s < 0 for s in recv_shape):
        _fail(op, "recv_shape", "non-negative sizes", str(list(recv_shape)))
    check_device(op, buf, send=send)


def check_cp(op: str, buf: Buffer, x: torch.Tensor) -> None:
    if x.dim() < 1:
        _fail(op, "x", "at least 1-D", _desc(x))
    check_device(op, buf, x=x)


def check_reduce_scatter(buf: Buffer, x: torch.Tensor) -> None:
    check_cp("cp_reduce_scatter", buf, x)
    if x.shape[0] % buf.world_size != 0:
        _fail("cp_reduce_scatter", "x", f"dim 0 divisible by the group size {buf.world_size}",
              _desc(x))
