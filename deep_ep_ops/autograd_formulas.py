"""The backward formulas of the EP ops with a C++ autograd kernel: one table for Python and C++.

deep_ep_ops/autograd.py registers their Python rendering (deep_ep_ops/codegen/py_autograd.py,
compiled at import) on the Autograd key: CPU tensors, and CUDA with DEEP_EP_OPS_CPP_AUTOGRAD=0.
deep_ep_ops/codegen/ep_autograd.py renders them as ``generated/ep_autograd_formulas.hpp``, the
AutogradCUDA kernels that csrc/torch/ep_autograd.cpp registers, so an eager CUDA call never
enters Python.

A formula says what the forward keeps (tensors saved for backward, non-tensors kept) and the
backward as statements over the vocabulary of deep_ep_ops/formula_expr.py. Every backward calls
the ops through the dispatcher (with autograd), so double backward, torch.compile and
CUDA-graph capture see the same graph as the forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deep_ep_ops import handle as H
from deep_ep_ops.formula_expr import (NO_TENSOR, Cond, Const, Dtype, Expr, Grad, GradOf, Keep,
                                      Local, Needs, NewZeros, OpCall, Saved, Set, Stmt, When,
                                      statements, walk_exprs, where, zeros_like)
from deep_ep_ops.schemas import SCHEMAS

# The kinds of schema argument types (formula_expr.CPP_TYPES names their C++ values).
_ARG_KINDS = {"Tensor": "tensor", "Optional[Tensor]": "tensor?", "str": "str", "int": "int",
              "bool": "bool"}


@dataclass(frozen=True)
class Arg:
    """One argument of the op (schemas.py), in order."""
    name: str
    kind: str  # "tensor", "tensor?" (Tensor?), "str", "int", "bool"


@dataclass(eq=False)
class Formula:
    """The autograd of op ``op``: its forward saves ``save`` (arguments or outputs, by name;
    ``outputs`` names the outputs) and keeps ``keep``; its backward runs ``body``."""
    op: str
    outputs: tuple[str, ...]
    save: tuple[Saved, ...]
    keep: tuple[Keep, ...]
    body: tuple[Stmt, ...]

    def __post_init__(self) -> None:
        schema = torch._C.parse_schema(SCHEMAS[self.op])
        self.args = tuple(Arg(a.name, _ARG_KINDS[str(a.type)]) for a in schema.arguments)
        assert len(schema.returns) == len(self.outputs), self.op
        assert all(r.name in ("", o) for r, o in zip(schema.returns, self.outputs)), self.op
        self.positions = {a.name: i for i, a in enumerate(self.args)}
        self.output_index = {name: i for i, name in enumerate(self.outputs)}
        assert not set(self.positions) & set(self.output_index), f"{self.op}: a name twice"
        kinds = {a.name: a.kind for a in self.args}
        for s in self.save:
            assert kinds.get(s.name, "tensor").startswith("tensor"), f"{self.op} saves {s.name}"
            assert s.name in kinds or s.name in self.output_index, f"{self.op}: {s.name}?"
        for k in self.keep:
            source = k.name if k.size_of is None else k.size_of[0]
            want = "tensor" if k.size_of is not None else k.kind
            assert kinds.get(source) == want, f"{self.op} keeps {k.name}: {kinds.get(source)}"
        self._check_reads()

    def _check_reads(self) -> None:
        """The body reads only what the forward saved or kept, the op's outputs' gradients,
        and its tensor arguments' needs, and it reads all that is saved or kept (else the
        forward would store it for nothing, and C++ warns of an unused variable)."""
        saved = {s.name for s in self.save}
        kept = {k.name for k in self.keep}
        read = set()
        for node in walk_exprs(self.body):
            if isinstance(node, Saved):
                assert node.name in saved, f"{self.op} reads unsaved {node.name}"
                read.add(node.name)
            elif isinstance(node, Keep):
                assert node.name in kept, f"{self.op} reads unkept {node.name}"
                read.add(node.name)
            elif isinstance(node, GradOf):
                assert node.name in self.output_index, f"{self.op}: no output {node.name}"
            elif isinstance(node, Needs):
                assert self.kind(node.name).startswith("tensor"), f"{self.op}: {node.name}"
        assert read == saved | kept, f"{self.op} stores {(saved | kept) - read} for nothing"
        for stmt in statements(self.body):
            if isinstance(stmt, Grad):
                assert self.kind(stmt.name).startswith("tensor"), f"{self.op}: {stmt.name}"

    def needed(self) -> list[str]:
        """The arguments whose ``needs_<arg>`` the body reads, in argument order."""
        names = {n.name for n in walk_exprs(self.body) if isinstance(n, Needs)}
        return [a.name for a in self.args if a.name in names]

    def graded(self) -> list[str]:
        """The arguments the body gives a gradient, in argument order."""
        names = {s.name for s in statements(self.body) if isinstance(s, Grad)}
        return [a.name for a in self.args if a.name in names]

    def locals(self) -> list[Local]:
        """The locals the body sets, each once, in order."""
        found = {id(s.local): s.local for s in statements(self.body) if isinstance(s, Set)}
        return list(found.values())

    def grads_read(self) -> list[str]:
        """The outputs whose gradient the body reads, in output order."""
        names = {n.name for n in walk_exprs(self.body) if isinstance(n, GradOf)}
        return [o for o in self.outputs if o in names]

    def kind(self, name: str) -> str:
        return self.args[self.positions[name]].kind

    def save_sources(self) -> tuple[tuple[bool, int], ...]:
        """(from the outputs?, index) of every saved tensor, in order."""
        return tuple((s.name in self.output_index,
                      self.output_index.get(s.name, self.positions.get(s.name, -1)))
                     for s in self.save)

    def keep_sources(self) -> tuple[tuple[str, int, Optional[int]], ...]:
        """(name, argument position, size dim or None) of every kept value, in order."""
        return tuple((k.name, self.positions[k.name if k.size_of is None else k.size_of[0]],
                      None if k.size_of is None else k.size_of[1]) for k in self.keep)


# ---- the nodes the formulas share ----------------------------------------------------------

GROUP_NAME = Keep("group_name", "str")
NUM_SMS = Keep("num_sms", "int")
HANDLE = Saved("handle")
F32, F64, I64 = Dtype(torch.float32), Dtype(torch.float64), Dtype(torch.int64)


def combine_rows(rows: Expr) -> Expr:
    """combine(rows, handle) with autograd: the gradient that sums the copies of every token."""
    return OpCall("combine", rows.contiguous(), HANDLE, NO_TENSOR, GROUP_NAME, NUM_SMS)


# ---- _dispatch_static: d x = combine(d recv_x); d topk_weights[t, k] = the gradient of the
# recv_topk_weights entry that carried slot k (exactly one rank holds each (t, k), so a combine
# of the slot-placed gradients returns it) ------------------------------------------------------

G_RECV_X, G_RECV_W = GradOf("recv_x"), GradOf("recv_topk_weights")
SLOT, ROWS = Local("slot"), Local("rows")
EXPAND = Keep("expand", "bool")
NUM_TOPK = Keep("num_topk", "symint", size_of=("topk_weights", 1))

DISPATCH_STATIC = Formula(
    "_dispatch_static",
    outputs=("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
             "tokens_per_expert", "handle"),
    save=(HANDLE, Saved("recv_topk_idx")),
    keep=(GROUP_NAME, EXPAND, NUM_SMS, NUM_TOPK),
    body=(
        When(Needs("x") & G_RECV_X.defined(), (Grad("x", combine_rows(G_RECV_X)),)),
        When(Needs("topk_weights") & G_RECV_W.defined(), (
            # expert-major rows carry one slot each: put the row's gradient in its column
            # (the receive part is the handle's last C rows, on one host and on several)
            When(EXPAND, (
                Set(SLOT, HANDLE.last_rows(G_RECV_W.size(0))
                    .select(1, Const(H.RECV_TOPK_SLOT, "handle::kRecvTopkSlot")).to(I64)),
                Set(ROWS, NewZeros(G_RECV_W, (G_RECV_W.size(0), NUM_TOPK)).scatter(
                    1, SLOT.clamp_min(0).unsqueeze(1),
                    where(SLOT.ge(0), G_RECV_W, zeros_like(G_RECV_W)).unsqueeze(1))),
            ), otherwise=(
                # compact rows carry every slot of the token: keep the valid ones
                Set(ROWS, where(Saved("recv_topk_idx").ge(0), G_RECV_W, zeros_like(G_RECV_W))),
            )),
            Grad("topk_weights", combine_rows(ROWS)),
        )),
    ))

# ---- cached_dispatch: d x = combine(d recv_x) ----------------------------------------------

CACHED_DISPATCH = Formula(
    "cached_dispatch",
    outputs=("recv_x", "recv_x_scales"),
    save=(HANDLE,),
    keep=(GROUP_NAME, NUM_SMS),
    body=(When(Needs("x") & G_RECV_X.defined(), (Grad("x", combine_rows(G_RECV_X)),)),))

# ---- combine: d x[row] = w[row] * d out[t(row)] (a cached dispatch of d out);
# d w[row] = <d out[t(row)], x[row]>, both accumulated in fp32 (fp64 for fp64) ----------------

G_OUT = GradOf("out")
X, WEIGHTS = Saved("x"), Saved("weights")
ACC = Local("acc", "dtype")

COMBINE = Formula(
    "combine",
    outputs=("out",),
    save=(X, HANDLE, WEIGHTS),
    keep=(GROUP_NAME, NUM_SMS),
    body=(When(G_OUT.defined(), (
        Set(ROWS, OpCall("cached_dispatch", G_OUT.contiguous(), NO_TENSOR, HANDLE, GROUP_NAME,
                         NUM_SMS, outputs=2)[0]),
        Set(ACC, Cond(X.dtype() == F64, F64, F32)),
        When(Needs("x"), (Grad("x", Cond(
            WEIGHTS.defined(), (ROWS.to(ACC) * WEIGHTS.to(ACC).unsqueeze(1)).to(X.dtype()),
            ROWS)),)),
        When(Needs("weights"), (
            Grad("weights", (ROWS.to(ACC) * X.to(ACC)).sum(-1).to(WEIGHTS.dtype())),)),
    )),))

FORMULAS = (DISPATCH_STATIC, CACHED_DISPATCH, COMBINE)
