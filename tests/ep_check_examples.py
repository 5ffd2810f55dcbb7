"""One failing call per rule of deep_ep_ops/check_rules.py, with the exact message it must raise.

``EXAMPLES[rule_id] = (op, args(dev), message)``: ``args`` are the op's arguments without
``group_name`` (a valid call with one argument spoilt, so the named rule is the first to fail);
the message has ``{group}`` for ``repr(buf.group_name)`` and ``{dev}`` for the tensors' device.
Shared by tests/test_check_rules.py (Python and the rendered C++ checks, on CPU) and
tests/gpu/test_errors_gpu.py (the C++ CUDA kernels), for a Buffer of E=4, K=2, M=4, H=8.

The device rules' examples (``ON_CUDA_BUFFER``) need a Buffer on CUDA (an NCCL group): their
spoilt tensor is on the CPU. On a machine without a GPU the tests run them against a stand-in
with the Buffer's facts on CUDA, the other tensors on ``meta`` (which the device rules pass).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

E, K, M, HID = 4, 2, 4, 8
C = 4  # rows of a combine input, and of the handles below
WIDTH = 12  # deep_ep_ops.handle.handle_width(K)

Args = dict[str, Any]


def dispatch_args(dev: str, **changes: Any) -> Args:
    args = dict(x=torch.ones(3, HID, device=dev), x_scales=None,
                topk_idx=torch.tensor([[0, 1], [2, 3], [1, -1]], device=dev),
                topk_weights=torch.ones(3, K, device=dev), num_experts=E, expert_alignment=1,
                num_sms=0)
    args.update(changes)
    return args


def _handle(dev: str, rows: int = 1 + 3 + C, width: int = WIDTH) -> torch.Tensor:
    """A handle of the right shape (the shape rules do not read its values)."""
    return torch.zeros(rows, width, dtype=torch.int32, device=dev)


def cached_args(dev: str, **changes: Any) -> Args:
    args = dict(x=torch.ones(3, HID, device=dev), x_scales=None, handle=_handle(dev), num_sms=0)
    args.update(changes)
    return args


def combine_args(dev: str, **changes: Any) -> Args:
    args = dict(x=torch.ones(C, HID, device=dev), handle=_handle(dev), weights=None, num_sms=0)
    args.update(changes)
    return args


def _fp8(dev: str, rows: int = 3) -> torch.Tensor:
    return torch.ones(rows, HID, device=dev).to(torch.float8_e4m3fn)


def _t(dev: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(*shape, device=dev, dtype=dtype)


def _d(op: str, arg: str, expected: str, got: str) -> str:
    return f"deep_ep.{op}: {arg} must be {expected}; got {got}"


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, laid out column-major (not contiguous)."""
    return t.t().contiguous().t()


def _strided_column(dev: str, rows: int) -> torch.Tensor:
    """A [rows, 1] float32 tensor, every other element of a [rows, 2] one (strides (2, 1))."""
    return _t(dev, rows, 2)[:, :1]


def _device(op: str, arg: str, got: str) -> str:
    """The device rule's message for a Buffer on CUDA given ``arg`` on the CPU."""
    return _d(op, arg, "on cuda (group {group} is nccl)", f"{got} on cpu")


def _idx(dev: str) -> torch.Tensor:
    return torch.tensor([[0, 1], [2, 3], [1, -1]], device=dev)


EXAMPLES: dict[str, tuple[str, Callable[[str], Args], str]] = {
    "dispatch.x_2d": ("dispatch", lambda d: dispatch_args(d, x=_t(d, 1, 3, HID)), _d(
        "dispatch", "x", "2-D [T, H]", "shape (1, 3, 8) torch.float32 on {dev}")),
    "dispatch.x_dtype": ("dispatch", lambda d: dispatch_args(d, x=_t(d, 3, HID, dtype=torch.int32)),
                         _d("dispatch", "x", "a float dtype (bf16/fp16/fp32/fp64) or float8_e4m3fn",
                            "shape (3, 8) torch.int32 on {dev}")),
    "dispatch.x_hidden": ("dispatch", lambda d: dispatch_args(d, x=_t(d, 3, HID + 1)), _d(
        "dispatch", "x", "[T, 8] (hidden of the Buffer for {group})",
        "shape (3, 9) torch.float32 on {dev}")),
    "dispatch.x_tokens": (
        "dispatch",
        lambda d: dispatch_args(d, x=_t(d, M + 1, HID),
                                topk_idx=torch.tensor([[0, 1]] * (M + 1), device=d),
                                topk_weights=_t(d, M + 1, K)),
        _d("dispatch", "x", "at most num_max_tokens_per_rank=4 rows",
           "shape (5, 8) torch.float32 on {dev}")),
    "dispatch.x_scales_missing": ("dispatch", lambda d: dispatch_args(d, x=_fp8(d)), _d(
        "dispatch", "x_scales", "a [T, P] float32/int32 tensor when x is float8_e4m3fn",
        "None")),
    "dispatch.x_scales_unwanted": ("dispatch", lambda d: dispatch_args(d, x_scales=_t(d, 3, 1)),
                                   _d("dispatch", "x_scales", "None unless x is float8_e4m3fn",
                                      "shape (3, 1) torch.float32 on {dev}")),
    "dispatch.x_scales_shape": (
        "dispatch",
        lambda d: dispatch_args(d, x=_fp8(d), x_scales=_t(d, 3, 1, dtype=torch.float16)),
        _d("dispatch", "x_scales", "[3, P] float32 or int32 (4-byte scale packs)",
           "shape (3, 1) torch.float16 on {dev}")),
    "dispatch.x_scales_packs": ("dispatch",
                                lambda d: dispatch_args(d, x=_fp8(d), x_scales=_t(d, 3, 2)),
                                _d("dispatch", "x_scales", "at most ceil(H/32)=1 packs per row",
                                   "shape (3, 2) torch.float32 on {dev}")),
    "dispatch.topk_idx": (
        "dispatch",
        lambda d: dispatch_args(d, topk_idx=torch.tensor([[0], [2], [1]], device=d)),
        _d("dispatch", "topk_idx", "[3, 2] int64 or int32 (K = num_topk of the Buffer)",
           "shape (3, 1) torch.int64 on {dev}")),
    "dispatch.topk_weights": ("dispatch", lambda d: dispatch_args(d, topk_weights=_t(d, 2, K)),
                              _d("dispatch", "topk_weights", "[3, 2] float32",
                                 "shape (2, 2) torch.float32 on {dev}")),
    "dispatch.num_experts": ("dispatch", lambda d: dispatch_args(d, num_experts=8), _d(
        "dispatch", "num_experts", "4 (num_experts of the Buffer)", "8")),
    "dispatch.expert_alignment": ("dispatch", lambda d: dispatch_args(d, expert_alignment=0), _d(
        "dispatch", "expert_alignment", "an int >= 1", "0")),
    "dispatch.num_sms": ("dispatch", lambda d: dispatch_args(d, num_sms=-1), _d(
        "dispatch", "num_sms", ">= 0 (0 = automatic)", "-1")),
    "dispatch.x_device": ("dispatch", lambda d: dispatch_args(d, x=_t("cpu", 3, HID)),
                          _device("dispatch", "x", "shape (3, 8) torch.float32")),
    "dispatch.x_scales_device": (
        "dispatch", lambda d: dispatch_args(d, x=_fp8(d), x_scales=_t("cpu", 3, 1)),
        _device("dispatch", "x_scales", "shape (3, 1) torch.float32")),
    "dispatch.topk_idx_device": ("dispatch", lambda d: dispatch_args(d, topk_idx=_idx("cpu")),
                                 _device("dispatch", "topk_idx", "shape (3, 2) torch.int64")),
    "dispatch.topk_weights_device": (
        "dispatch", lambda d: dispatch_args(d, topk_weights=_t("cpu", 3, K)),
        _device("dispatch", "topk_weights", "shape (3, 2) torch.float32")),
    "dispatch.x_contiguous": ("dispatch", lambda d: dispatch_args(d, x=_t(d, HID, 3).t()),
                              _d("dispatch", "x", "contiguous", "strides (1, 3)")),
    "dispatch.x_scales_contiguous": (
        "dispatch", lambda d: dispatch_args(d, x=_fp8(d), x_scales=_strided_column(d, 3)),
        _d("dispatch", "x_scales", "contiguous", "strides (2, 1)")),
    "dispatch.topk_idx_contiguous": (
        "dispatch", lambda d: dispatch_args(d, topk_idx=_column_major(_idx(d))),
        _d("dispatch", "topk_idx", "contiguous", "strides (1, 3)")),
    "dispatch.topk_weights_contiguous": (
        "dispatch", lambda d: dispatch_args(d, topk_weights=_t(d, K, 3).t()),
        _d("dispatch", "topk_weights", "contiguous", "strides (1, 3)")),
    "dispatch.expert_ids": (
        "dispatch", lambda d: dispatch_args(d, topk_idx=torch.tensor([[0, 1], [2, E], [1, -2]],
                                                                     device=d)),
        _d("dispatch", "topk_idx", "expert ids in [-1, 4)", "topk_idx[1, 1] = 4")),
    "dispatch.expert_ids_unique": (
        "dispatch", lambda d: dispatch_args(d, topk_idx=torch.tensor([[0, 1], [-1, -1], [3, 3]],
                                                                     device=d)),
        _d("dispatch", "topk_idx", "free of duplicate expert ids within a row", "row 2 = [3, 3]")),

    "cached_dispatch.handle": (
        "cached_dispatch", lambda d: cached_args(d, handle=_handle(d, 9, 3)),
        _d("cached_dispatch", "handle",
           "the int32 [1 + T + V + C, 12] handle returned by dispatch on group {group}",
           "shape (9, 3) torch.int32 on {dev}")),
    "cached_dispatch.x": ("cached_dispatch",
                          lambda d: cached_args(d, x=_t(d, 3, HID, dtype=torch.int32)),
                          _d("cached_dispatch", "x", "a 2-D [T, H] float or float8_e4m3fn tensor",
                             "shape (3, 8) torch.int32 on {dev}")),
    "cached_dispatch.x_hidden": ("cached_dispatch", lambda d: cached_args(d, x=_t(d, 3, HID + 1)),
                                 _d("cached_dispatch", "x", "[T, <= 8] (hidden of the Buffer)",
                                    "shape (3, 9) torch.float32 on {dev}")),
    "cached_dispatch.x_rows": (
        "cached_dispatch", lambda d: cached_args(d, x=_t(d, 1 + 3 + C, HID)),
        _d("cached_dispatch", "x", "[T, H] with T of the dispatch that made handle (8 rows)",
           "shape (8, 8) torch.float32 on {dev}")),
    "cached_dispatch.x_scales_given": (
        "cached_dispatch", lambda d: cached_args(d, x_scales=_t(d, 3, 1)),
        _d("cached_dispatch", "x_scales", "given exactly when x is float8_e4m3fn",
           "shape (3, 1) torch.float32 on {dev}")),
    "cached_dispatch.x_scales_shape": (
        "cached_dispatch",
        lambda d: cached_args(d, x=_fp8(d), x_scales=_t(d, 3, 1, dtype=torch.float16)),
        _d("cached_dispatch", "x_scales", "[3, P] float32 or int32",
           "shape (3, 1) torch.float16 on {dev}")),
    "cached_dispatch.num_sms": ("cached_dispatch", lambda d: cached_args(d, num_sms=-2), _d(
        "cached_dispatch", "num_sms", ">= 0 (0 = automatic)", "-2")),
    "cached_dispatch.x_device": ("cached_dispatch", lambda d: cached_args(d, x=_t("cpu", 3, HID)),
                                 _device("cached_dispatch", "x", "shape (3, 8) torch.float32")),
    "cached_dispatch.x_scales_device": (
        "cached_dispatch", lambda d: cached_args(d, x=_fp8(d), x_scales=_t("cpu", 3, 1)),
        _device("cached_dispatch", "x_scales", "shape (3, 1) torch.float32")),
    "cached_dispatch.handle_device": (
        "cached_dispatch", lambda d: cached_args(d, handle=_handle("cpu")),
        _device("cached_dispatch", "handle", f"shape (8, {WIDTH}) torch.int32")),
    "cached_dispatch.x_contiguous": (
        "cached_dispatch", lambda d: cached_args(d, x=_t(d, HID, 3).t()),
        _d("cached_dispatch", "x", "contiguous", "strides (1, 3)")),
    "cached_dispatch.x_scales_contiguous": (
        "cached_dispatch", lambda d: cached_args(d, x=_fp8(d), x_scales=_strided_column(d, 3)),
        _d("cached_dispatch", "x_scales", "contiguous", "strides (2, 1)")),
    "cached_dispatch.handle_contiguous": (
        "cached_dispatch", lambda d: cached_args(d, handle=_column_major(_handle(d))),
        _d("cached_dispatch", "handle", "contiguous", "strides (1, 8)")),

    "combine.handle": (
        "combine", lambda d: combine_args(d, handle=_handle(d, 9, 3)),
        _d("combine", "handle",
           "the int32 [1 + T + V + C, 12] handle returned by dispatch on group {group}",
           "shape (9, 3) torch.int32 on {dev}")),
    "combine.x": ("combine", lambda d: combine_args(d, x=_t(d, C, HID, dtype=torch.int32)), _d(
        "combine", "x", "a 2-D [C, H] float tensor (the rows of dispatch's output)",
        "shape (4, 8) torch.int32 on {dev}")),
    "combine.x_hidden": ("combine", lambda d: combine_args(d, x=_t(d, C, HID + 1)), _d(
        "combine", "x", "[C, <= 8] (hidden of the Buffer)", "shape (4, 9) torch.float32 on {dev}")),
    "combine.x_rows": (
        "combine", lambda d: combine_args(d, x=_t(d, 1 + 3 + C, HID)),
        _d("combine", "x", "[C, H] with C rows of the dispatch that made handle (8 handle rows)",
           "shape (8, 8) torch.float32 on {dev}")),
    "combine.weights": ("combine", lambda d: combine_args(d, weights=_t(d, 3)), _d(
        "combine", "weights", "None or [4] float32 (one weight per row)",
        "shape (3,) torch.float32 on {dev}")),
    "combine.num_sms": ("combine", lambda d: combine_args(d, num_sms=-3), _d(
        "combine", "num_sms", ">= 0 (0 = automatic)", "-3")),
    "combine.x_device": ("combine", lambda d: combine_args(d, x=_t("cpu", C, HID)),
                         _device("combine", "x", "shape (4, 8) torch.float32")),
    "combine.handle_device": ("combine", lambda d: combine_args(d, handle=_handle("cpu")),
                              _device("combine", "handle", f"shape (8, {WIDTH}) torch.int32")),
    "combine.weights_device": ("combine", lambda d: combine_args(d, weights=_t("cpu", C)),
                               _device("combine", "weights", "shape (4,) torch.float32")),
    "combine.x_contiguous": ("combine", lambda d: combine_args(d, x=_t(d, HID, C).t()),
                             _d("combine", "x", "contiguous", "strides (1, 4)")),
    "combine.handle_contiguous": (
        "combine", lambda d: combine_args(d, handle=_column_major(_handle(d))),
        _d("combine", "handle", "contiguous", "strides (1, 8)")),
    "combine.weights_contiguous": ("combine", lambda d: combine_args(d, weights=_t(d, 2 * C)[::2]),
                                   _d("combine", "weights", "contiguous", "strides (2,)")),
}

# The examples whose Buffer must be on CUDA (see the module's docstring).
ON_CUDA_BUFFER = frozenset(rule_id for rule_id in EXAMPLES if rule_id.endswith("_device"))
# The examples of value rules: they read the data, so on CUDA tensors they need
# DEEP_EP_OPS_VALIDATE=1, and meta tensors cannot show them.
READS_DATA = frozenset({"dispatch.expert_ids", "dispatch.expert_ids_unique"})


def expected(rule_id: str, group_name: str, dev: str) -> str:
    """The message of ``rule_id``'s example for a Buffer of group ``group_name`` on ``dev``."""
    return EXAMPLES[rule_id][2].format(group=repr(group_name), dev=dev)
