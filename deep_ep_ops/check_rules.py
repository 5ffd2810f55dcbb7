"""The input checks of dispatch, cached_dispatch and combine (shape, dtype, range, device,
memory layout; then the values of topk_idx and the handle's header): one table for Python and
C++.

deep_ep_ops/validation.py runs these rules (CPU backend, fake impls) as the Python functions
deep_ep_ops/codegen/py_checks.py renders from them; deep_ep_ops/codegen/ep_checks.py renders
them as ``generated/ep_checks.hpp``, which the C++ CUDA kernels (csrc/torch/ep_kernels.cpp) call
on the eager path. Rules run in order and the first that fails raises
``ValueError("deep_ep.<op>: <arg> must be <expected>; got <got>")``, where ``got`` describes
the argument (a tensor's shape, dtype and device; ``None``; an int) unless the rule says.

Not here: a gloo Buffer given CUDA tensors meets C++ at its group lookup, before these rules
(it has no EP state to read the facts from; csrc/torch/ep_kernels.cpp ``state_of`` words it as
the device rule does).
tests/ep_check_examples.py holds one failing call per rule with its exact message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from string import Formatter
from typing import Optional, Union

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.check_expr import (Const, DtypeClass, Either, Entry, Expr, Fact, GroupRepr,
                                    HeaderField, Int, Tensor)

FLOAT = DtypeClass("is_float", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
FP8 = DtypeClass("is_fp8", (torch.float8_e4m3fn,))
INDEX = DtypeClass("is_index", (torch.int32, torch.int64))
SCALE = DtypeClass("is_scale", (torch.float32, torch.int32))  # 4-byte scale packs
INT32 = DtypeClass("is_int32", (torch.int32,))
DTYPE_CLASSES = (FLOAT, FP8, INDEX, SCALE, INT32)

# What the checks read of the Buffer (C++: of the EP state ``st``).
HIDDEN = Fact("hidden", "buf.hidden", "st.cfg.hidden")
MAX_TOKENS = Fact("max_tokens", "buf.num_max_tokens_per_rank", "st.cfg.max_tokens")
NUM_TOPK = Fact("num_topk", "buf.num_topk", "st.cfg.topk")
NUM_EXPERTS_OF_BUFFER = Fact("num_experts", "buf.num_experts", "st.cfg.num_experts")
HANDLE_WIDTH = Fact("handle_width", "H.handle_width(buf.num_topk)", "st.handle_width")
# Where the Buffer's tensors live. The C++ kernels serve only Buffers with an EP state, which
# are NCCL Buffers on CUDA (buffer.py), so C++ fills in constants.
ON_CUDA = Fact("on_cuda", 'buf.device.type == "cuda"', "true", "bool")
DEVICE = Fact("device", "buf.device.type", '"cuda"', "str")
BACKEND = Fact("backend", "buf.backend", '"nccl"', "str")
FACTS = (HIDDEN, MAX_TOKENS, NUM_TOPK, NUM_EXPERTS_OF_BUFFER, HANDLE_WIDTH, ON_CUDA, DEVICE,
         BACKEND)
GROUP = GroupRepr()
HEADER_ROWS = Const(H.HEADER_ROWS, "handle::kHeaderRows")

# The arguments of the ops (schemas.py), shared by the ops that take them.
X = Tensor("x")
X_SCALES = Tensor("x_scales", optional=True)
TOPK_IDX = Tensor("topk_idx")
TOPK_WEIGHTS = Tensor("topk_weights")
HANDLE = Tensor("handle")
WEIGHTS = Tensor("weights", optional=True)
NUM_EXPERTS = Int("num_experts")
EXPERT_ALIGNMENT = Int("expert_alignment")
NUM_SMS = Int("num_sms")

Arg = Union[Tensor, Int]


@dataclass(eq=False)
class Rule:
    """``arg`` must not meet ``fails``; else the message says it must be ``expected``, a format
    string whose ``{name}`` fields are the nodes given in ``values`` (ints print as str,
    GROUP as repr), and what it got: ``got`` (a str node) or, by default, the argument's
    description."""
    name: str
    arg: Arg
    fails: Expr
    expected: str
    values: dict[str, Expr] = field(default_factory=dict)
    got: Optional[Expr] = None

    def __post_init__(self) -> None:
        fields = {f for _, f, _, _ in Formatter().parse(self.expected) if f is not None}
        assert fields == set(self.values), f"rule {self.name}: {fields} vs {set(self.values)}"


@dataclass(eq=False)
class OpChecks:
    """The rules of one op, in order, over ``args`` (the checked arguments in signature
    order: the C++ check function takes them so)."""
    op: str
    args: tuple[Arg, ...]
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        names = {a.name for a in self.args}
        for rule in self.rules:
            used = rule.fails.args() | {rule.arg.name}
            for v in rule.values.values():
                used |= v.args()
            if rule.got is not None:
                used |= rule.got.args()
            assert used <= names, f"{self.op}.{rule.name} reads {used - names}"
        assert len({r.name for r in self.rules}) == len(self.rules), f"{self.op}: duplicate rule"


def _if_given(t: Tensor, cond: Expr) -> Expr:
    """``cond`` of tensor ``t``, which an optional ``t`` meets only when given."""
    return t.given() & cond if t.optional else cond


def placement_rules(*tensors: Tensor) -> tuple[Rule, ...]:
    """Each tensor on the Buffer's device (meta tensors carry none and pass; fake ones carry
    the device they stand for), then each contiguous: after the shape rules, in argument
    order."""
    device = tuple(Rule(f"{t.name}_device", t,
                        _if_given(t, ~t.is_meta() & (t.is_cuda() != ON_CUDA)),
                        "on {device} (group {group} is {backend})",
                        {"device": DEVICE, "group": GROUP, "backend": BACKEND})
                   for t in tensors)
    layout = tuple(Rule(f"{t.name}_contiguous", t, _if_given(t, ~t.is_contiguous()),
                        "contiguous", got=t.strides())
                   for t in tensors)
    return device + layout


T = X.size(0)  # tokens (dispatch, cached_dispatch) or rows (combine) of x

NUM_SMS_RULE = Rule("num_sms", NUM_SMS, NUM_SMS < 0, ">= 0 (0 = automatic)")
HANDLE_RULE = Rule(
    "handle", HANDLE,
    (HANDLE.dim() != 2) | (HANDLE.size(1) != HANDLE_WIDTH) | ~HANDLE.dtype_in(INT32) |
    (HANDLE.size(0) < HEADER_ROWS),
    "the int32 [1 + T + V + C, {width}] handle returned by dispatch on group {group}",
    {"width": HANDLE_WIDTH, "group": GROUP})

DISPATCH = OpChecks("dispatch", (X, X_SCALES, TOPK_IDX, TOPK_WEIGHTS, NUM_EXPERTS,
                                 EXPERT_ALIGNMENT, NUM_SMS), (
    Rule("x_2d", X, X.dim() != 2, "2-D [T, H]"),
    Rule("x_dtype", X, ~X.dtype_in(FLOAT, FP8),
         "a float dtype (bf16/fp16/fp32/fp64) or float8_e4m3fn"),
    Rule("x_hidden", X, X.size(1) != HIDDEN, "[T, {hidden}] (hidden of the Buffer for {group})",
         {"hidden": HIDDEN, "group": GROUP}),
    Rule("x_tokens", X, T > MAX_TOKENS, "at most num_max_tokens_per_rank={max_tokens} rows",
         {"max_tokens": MAX_TOKENS}),
    Rule("x_scales_missing", X_SCALES, X.dtype_in(FP8) & ~X_SCALES.given(),
         "a [T, P] float32/int32 tensor when x is float8_e4m3fn"),
    Rule("x_scales_unwanted", X_SCALES, X_SCALES.given() & ~X.dtype_in(FP8),
         "None unless x is float8_e4m3fn"),
    Rule("x_scales_shape", X_SCALES,
         X_SCALES.given() & ((X_SCALES.dim() != 2) | (X_SCALES.size(0) != T) |
                             ~X_SCALES.dtype_in(SCALE)),
         "[{T}, P] float32 or int32 (4-byte scale packs)", {"T": T}),
    Rule("x_scales_packs", X_SCALES,
         X_SCALES.given() & (X_SCALES.size(1) > (X.size(1) + 31) // 32),
         "at most ceil(H/32)={packs} packs per row", {"packs": (X.size(1) + 31) // 32}),
    Rule("topk_idx", TOPK_IDX,
         (TOPK_IDX.dim() != 2) | (TOPK_IDX.size(0) != T) | (TOPK_IDX.size(1) != NUM_TOPK) |
         ~TOPK_IDX.dtype_in(INDEX),
         "[{T}, {K}] int64 or int32 (K = num_topk of the Buffer)", {"T": T, "K": NUM_TOPK}),
    Rule("topk_weights", TOPK_WEIGHTS,
         (TOPK_WEIGHTS.dim() != 2) | (TOPK_WEIGHTS.size(0) != T) |
         (TOPK_WEIGHTS.size(1) != NUM_TOPK) | ~TOPK_WEIGHTS.dtype_in(FLOAT),
         "[{T}, {K}] float32", {"T": T, "K": NUM_TOPK}),
    Rule("num_experts", NUM_EXPERTS, NUM_EXPERTS != NUM_EXPERTS_OF_BUFFER,
         "{E} (num_experts of the Buffer)", {"E": NUM_EXPERTS_OF_BUFFER}),
    Rule("expert_alignment", EXPERT_ALIGNMENT,
         EXPERT_ALIGNMENT.not_int() | (EXPERT_ALIGNMENT < 1), "an int >= 1"),
    NUM_SMS_RULE,
    *placement_rules(X, X_SCALES, TOPK_IDX, TOPK_WEIGHTS),
))

CACHED_DISPATCH = OpChecks("cached_dispatch", (X, X_SCALES, HANDLE, NUM_SMS), (
    HANDLE_RULE,
    Rule("x", X, (X.dim() != 2) | ~X.dtype_in(FLOAT, FP8),
         "a 2-D [T, H] float or float8_e4m3fn tensor"),
    Rule("x_hidden", X, X.size(1) > HIDDEN, "[T, <= {hidden}] (hidden of the Buffer)",
         {"hidden": HIDDEN}),
    Rule("x_rows", X, T > HANDLE.size(0) - HEADER_ROWS,
         "[T, H] with T of the dispatch that made handle ({rows} rows)",
         {"rows": HANDLE.size(0)}),
    Rule("x_scales_given", X_SCALES, X.dtype_in(FP8) != X_SCALES.given(),
         "given exactly when x is float8_e4m3fn"),
    Rule("x_scales_shape", X_SCALES,
         X_SCALES.given() & ((X_SCALES.dim() != 2) | (X_SCALES.size(0) != T) |
                             ~X_SCALES.dtype_in(SCALE)),
         "[{T}, P] float32 or int32", {"T": T}),
    NUM_SMS_RULE,
    *placement_rules(X, X_SCALES, HANDLE),
))

COMBINE = OpChecks("combine", (X, HANDLE, WEIGHTS, NUM_SMS), (
    HANDLE_RULE,
    Rule("x", X, (X.dim() != 2) | ~X.dtype_in(FLOAT),
         "a 2-D [C, H] float tensor (the rows of dispatch's output)"),
    Rule("x_hidden", X, X.size(1) > HIDDEN, "[C, <= {hidden}] (hidden of the Buffer)",
         {"hidden": HIDDEN}),
    Rule("x_rows", X, T > HANDLE.size(0) - HEADER_ROWS,
         "[C, H] with C rows of the dispatch that made handle ({rows} handle rows)",
         {"rows": HANDLE.size(0)}),
    Rule("weights", WEIGHTS,
         WEIGHTS.given() & ((WEIGHTS.dim() != 1) | (WEIGHTS.size(0) != T) |
                            ~WEIGHTS.dtype_in(FLOAT)),
         "None or [{C}] float32 (one weight per row)", {"C": T}),
    NUM_SMS_RULE,
    *placement_rules(X, HANDLE, WEIGHTS),
))

OPS = (DISPATCH, CACHED_DISPATCH, COMBINE)


# ---- values of the arguments ---------------------------------------------------------------
# Value checks of dispatch, after the rules above: they read topk_idx, so Python runs them on
# CPU tensors (and on CUDA ones with DEEP_EP_OPS_VALIDATE=1: a host sync), elementwise on the
# tensor; the C++ kernels with DEEP_EP_OPS_VALIDATE=1, looping over a host copy. Both report
# the first failing entry in row-major order, or the first failing row.

@dataclass(eq=False)
class EntryRule:
    """No entry of the 2-D int tensor ``arg`` may meet ``fails`` (a condition over
    ``Entry(arg)``, ``Either`` for "or"); else "<arg> must be <expected>; got <arg>[t, k] =
    <entry>" for the first such entry."""
    name: str
    arg: Tensor
    fails: Expr
    expected: str
    values: dict[str, Expr] = field(default_factory=dict)


@dataclass(eq=False)
class UniqueRows:
    """No row of the 2-D int tensor ``arg`` may hold an entry ``>= low`` twice; else "<arg> must
    be <expected>; got row <t> = <the row as a Python list>" for the first such row."""
    name: str
    arg: Tensor
    low: int
    expected: str
    values: dict[str, Expr] = field(default_factory=dict)


@dataclass(eq=False)
class ValueChecks:
    """The value rules of op ``op``, in order, over ``args`` (in signature order)."""
    op: str
    args: tuple[Arg, ...]
    rules: tuple[Union[EntryRule, UniqueRows], ...]


EXPERT_ID = Entry(TOPK_IDX)
DISPATCH_VALUES = ValueChecks("dispatch", (TOPK_IDX, NUM_EXPERTS), (
    EntryRule("expert_ids", TOPK_IDX, Either(EXPERT_ID < -1, EXPERT_ID >= NUM_EXPERTS),
              "expert ids in [-1, {E})", {"E": NUM_EXPERTS}),
    UniqueRows("expert_ids_unique", TOPK_IDX, 0, "free of duplicate expert ids within a row"),
))
VALUE_OPS = (DISPATCH_VALUES,)


# ---- the handle's header -------------------------------------------------------------------
# Value checks of cached_dispatch and combine, after the rules above: the handle was made on the
# call's Buffer, and x has the rows its dispatch implies. Python reads the header row (a host
# sync on CUDA, so there only with DEEP_EP_OPS_VALIDATE=1); the C++ kernels read the facts from
# the host-side record of the handles their dispatch made (no sync), else from the header.
# A handle of the same Buffer and shape (two static-capacity dispatches of one Buffer return the
# same C whatever T) cannot be told apart from the right one.

@dataclass(eq=False)
class Check:
    """``fails`` must not hold; else ``ValueError("deep_ep.<op>: <message>")``, ``message`` a
    format string over ``values`` as a Rule's ``expected``."""
    name: str
    fails: Expr
    message: str
    values: dict[str, Expr] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fields = {f for _, f, _, _ in Formatter().parse(self.message) if f is not None}
        assert fields == set(self.values), f"check {self.name}: {fields} vs {set(self.values)}"


@dataclass(eq=False)
class HandleChecks:
    """The header checks of op ``op``, in order (over ``header``, the Buffer and ``x_rows``)."""
    op: str
    checks: tuple[Check, ...]


# What a dispatch stamped into the header (C++: HandleFacts, in its field order).
MADE_BUFFER = HeaderField("buffer_id", "HDR_BUFFER_ID")
MADE_RANKS = HeaderField("num_ranks", "HDR_NUM_RANKS")
MADE_TOPK = HeaderField("topk", "HDR_TOPK")
MADE_TOKENS = HeaderField("num_tokens", "HDR_NUM_TOKENS")
MADE_ROWS = HeaderField("num_rows", "HDR_NUM_ROWS")
HEADER_FIELDS = (MADE_BUFFER, MADE_RANKS, MADE_TOPK, MADE_TOKENS, MADE_ROWS)
# The call's Buffer (C++: BufferIdentity, filled by csrc/torch/ep_kernels.cpp from the state).
BUFFER_ID = Fact("buffer_id", "buf.id", "st.cfg.buffer_id")
NUM_RANKS = Fact("num_ranks", "buf.world_size", "st.cfg.num_ranks")
OWN_TOPK = Fact("topk", "buf.num_topk", "st.cfg.topk")
X_ROWS = Int("x_rows")  # rows of the call's x

SAME_BUFFER = Check(
    "buffer", MADE_BUFFER != BUFFER_ID,
    "handle belongs to another Buffer: it was made by a dispatch on Buffer #{made}, and group "
    "{group} has Buffer #{own} (a handle of another group, or of a Buffer destroyed since)",
    {"made": MADE_BUFFER, "group": GROUP, "own": BUFFER_ID})
SAME_SHAPE = Check(
    "ranks_topk", (MADE_RANKS != NUM_RANKS) | (MADE_TOPK != OWN_TOPK),
    "handle does not match the Buffer: it was made for R={R} ranks and K={K}, the Buffer has "
    "R={own_R}, K={own_K}",
    {"R": MADE_RANKS, "K": MADE_TOPK, "own_R": NUM_RANKS, "own_K": OWN_TOPK})

CACHED_DISPATCH_HANDLE = HandleChecks("cached_dispatch", (
    SAME_BUFFER, SAME_SHAPE,
    Check("x_rows", X_ROWS != MADE_TOKENS,
          "x has {rows} rows, the handle's dispatch had {T} tokens",
          {"rows": X_ROWS, "T": MADE_TOKENS}),
))
COMBINE_HANDLE = HandleChecks("combine", (
    SAME_BUFFER, SAME_SHAPE,
    Check("x_rows", X_ROWS != MADE_ROWS, "x has {rows} rows, the handle's dispatch produced {C}",
          {"rows": X_ROWS, "C": MADE_ROWS}),
))
HANDLE_OPS = (CACHED_DISPATCH_HANDLE, COMBINE_HANDLE)


def rule_ids() -> list[str]:
    """``<op>.<rule>`` of every rule that raises "<arg> must be ...", in table order (the
    argument rules, then the value rules)."""
    return [f"{c.op}.{r.name}" for c in OPS + VALUE_OPS for r in c.rules]
