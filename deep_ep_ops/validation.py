"""Input checks shared by the fake impls and every backend.

The shape / dtype / range / device / layout checks of dispatch, cached_dispatch and combine
are the rules of deep_ep_ops/check_rules.py (which the C++ kernels run too, rendered); this
module runs their Python rendering, and holds the other checks. Shape and dtype checks run
everywhere (fake tensors included, so a bad call fails at trace time). Value checks (expert ids
in range, no duplicate in a row, the handle's header, indices in range) read data: they always
run on CPU tensors, and on CUDA tensors only when ``DEEP_EP_OPS_VALIDATE=1`` and no graph is
being captured, because they cost a device-to-host sync.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from deep_ep_ops import check_rules as R
from deep_ep_ops.codegen import py_checks

if TYPE_CHECKING:
    from deep_ep_ops.buffer import Buffer

INDEX_DTYPES = R.INDEX.dtypes


def _fail(op: str, arg: str, expected: str, got: str) -> None:
    raise ValueError(f"deep_ep.{op}: {arg} must be {expected}; got {got}")


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {t.dtype} on {t.device}"


# The rules of check_rules.py as Python functions (codegen/py_checks.py renders them; the C++
# kernels run their other rendering, generated/ep_checks.hpp): the first rule a call fails
# raises. When the value rules run (wants_value_checks) is each language's own test: it asks the
# runtime (the environment, graph capture, fake tensors).
_RULES = py_checks.compile_checks(_fail, _desc)


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
    # The channel ops' device check (Python only: their CUDA kernels are Python glue); the EP
    # ops' is a rule of check_rules.py (placement_rules), with these words.
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


def check_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                   topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                   expert_alignment: int, num_sms: int) -> None:
    _RULES["dispatch"](buf, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
                       num_sms)
    if wants_value_checks(topk_idx) and topk_idx.numel() > 0:
        _RULES["dispatch_values"](topk_idx, num_experts)


def check_cached_dispatch(buf: Buffer, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                          handle: torch.Tensor, num_sms: int,
                          recorded: Optional[list[int]] = None) -> None:
    """``recorded``: the header facts a multi-host dispatch kept for this handle (checked
    always, no sync)."""
    _RULES["cached_dispatch"](buf, x, x_scales, handle, num_sms)
    _check_header("cached_dispatch", buf, handle, x.shape[0], recorded)


def check_combine(buf: Buffer, x: torch.Tensor, handle: torch.Tensor,
                  weights: Optional[torch.Tensor], num_sms: int,
                  recorded: Optional[list[int]] = None) -> None:
    """``recorded``: as for check_cached_dispatch."""
    _RULES["combine"](buf, x, handle, weights, num_sms)
    _check_header("combine", buf, handle, x.shape[0], recorded)


def _check_header(op: str, buf: Buffer, handle: torch.Tensor, x_rows: int,
                  recorded: Optional[list[int]]) -> None:
    if recorded is not None:
        check_recorded_header(op, buf, recorded, x_rows)
    if wants_value_checks(handle):
        check_handle_header(op, buf, handle, x_rows)


def check_handle_header(op: str, buf: Buffer, handle: torch.Tensor, x_rows: int) -> None:
    """Value checks of a handle's header row (they read it: free on CPU; on CUDA a host sync,
    so only with DEEP_EP_OPS_VALIDATE=1): the handle was made on this Buffer, and x has the rows
    its dispatch implies (cached_dispatch: that dispatch's T tokens; combine: its C rows); the
    checks of check_rules.py's ``<OP>_HANDLE``. The C++ CUDA kernels run them too
    (csrc/torch/handle_checks.cpp), for the handles their dispatch returned on every call, from
    a host-side record instead of the header."""
    check_recorded_header(op, buf, handle[0].tolist(), x_rows)


def check_recorded_header(op: str, buf: Buffer, header: list[int], x_rows: int) -> None:
    """The same checks on header values known on the host (a multi-host dispatch's record of
    the handle it returned: deep_ep_ops.cuda.multihost), so no sync."""
    _RULES[f"{op}_handle"](buf, header, x_rows)


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
