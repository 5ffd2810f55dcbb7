"""The vocabulary of the EP ops' backward formulas (deep_ep_ops/autograd_formulas.py).

Each node has two spellings side by side: ``py()``, the Python expression that
deep_ep_ops/autograd.py compiles into the Python autograd kernels (CPU tensors, and CUDA with
DEEP_EP_OPS_CPP_AUTOGRAD=0), and ``cpp()``, the C++ expression deep_ep_ops/codegen/ep_autograd.py
renders into the AutogradCUDA kernels. A formula written with these nodes is therefore one text
for both; Python compiles its rendering once at import, so a backward runs as fast as one
written by hand (walking the nodes on every call cost 2 to 10 us more).

Only operations spelt alike in both languages are offered (``t.unsqueeze(1)`` /
``t.unsqueeze(1)``, ``torch.where`` / ``at::where``), so each node renders one to one. Sizes
are SymInts in C++ (``sym_size``): under torch.compile with dynamic shapes they stay symbolic.

Statements (``Set``, ``Grad``, ``When``) make a formula's body (``py_lines`` / ``cpp_lines``).
Names in the rendered code: a saved tensor, a kept value and a local by their own name; the
gradient of output ``o`` is ``g_o``; argument ``a``'s gradient ``grad_a``, whether autograd
wants it ``needs_a``; the ops are ``_ops.<op>`` (Python) and ``<op>_op()`` (C++).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from deep_ep_ops.check_expr import CPP_DTYPES

# What a node's C++ value is (the renderer declares locals and kept values with these types).
CPP_TYPES = {"tensor": "at::Tensor", "dtype": "at::ScalarType", "bool": "bool",
             "int": "int64_t", "symint": "c10::SymInt", "str": "std::string"}


class Expr:
    """A node of a formula: its Python and C++ text."""

    kind = "tensor"  # a key of CPP_TYPES, or "tuple" (an op call with several outputs)

    def py(self) -> str:
        raise NotImplementedError

    def cpp(self) -> str:
        raise NotImplementedError

    def parts(self) -> tuple[Expr, ...]:
        """The nodes this one reads directly (the renderers walk them)."""
        return ()

    # tensor methods spelt alike in Python and C++
    def contiguous(self) -> Expr:
        return Method(self, "contiguous")

    def unsqueeze(self, dim: int) -> Expr:
        return Method(self, "unsqueeze", dim)

    def clamp_min(self, low: int) -> Expr:
        return Method(self, "clamp_min", low)

    def ge(self, other: int) -> Expr:
        return Method(self, "ge", other)

    def sum(self, dim: int) -> Expr:
        return Method(self, "sum", dim)

    def select(self, dim: int, index: Operand) -> Expr:
        return Method(self, "select", dim, index)

    def scatter(self, dim: int, index: Expr, src: Expr) -> Expr:
        return Method(self, "scatter", dim, index, src)

    def to(self, dtype: Expr) -> Expr:
        return Method(self, "to", dtype)

    def size(self, dim: int) -> Expr:
        return Size(self, dim)

    def dtype(self) -> Expr:
        return DtypeOf(self)

    def defined(self) -> Expr:
        return Defined(self)

    def last_rows(self, count: Expr) -> Expr:
        return LastRows(self, count)

    def __getitem__(self, index: int) -> Expr:
        return Item(self, index)

    def __mul__(self, other: Expr) -> Expr:
        return Binary("*", self, other)

    def __sub__(self, other: Expr) -> Expr:
        return Binary("-", self, other)

    def __eq__(self, other: Expr) -> Expr:  # type: ignore[override]
        return Binary("==", self, other)

    def __and__(self, other: Expr) -> Expr:
        return And(self, other)

    __hash__ = None  # type: ignore[assignment]


Operand = Union[Expr, int]


def _py(arg: Operand) -> str:
    return arg.py() if isinstance(arg, Expr) else str(arg)


def _cpp(arg: Operand) -> str:
    return arg.cpp() if isinstance(arg, Expr) else str(arg)


def _nodes(*args: Operand) -> tuple[Expr, ...]:
    return tuple(a for a in args if isinstance(a, Expr))


# ---- what a backward reads -----------------------------------------------------------------

class _Named(Expr):
    """A node the rendered code holds in a variable of its own name."""
    name: str

    def py(self) -> str:
        return self.name

    def cpp(self) -> str:
        return self.name


@dataclass(eq=False)
class Saved(_Named):
    """A tensor the forward saved: an argument or an output of the op, by its schema name (an
    optional argument given as None: Python None, C++ an undefined tensor)."""
    name: str


@dataclass(eq=False)
class Keep(_Named):
    """A non-tensor the forward keeps for the backward: the op argument ``name``, or with
    ``size_of=(argument, dim)`` that tensor argument's size (a SymInt). Python: an attribute of
    ctx; C++: ``ctx->saved_data[name]``."""
    name: str
    kind: str = "int"
    size_of: Optional[tuple[str, int]] = None

    def __post_init__(self) -> None:
        assert self.kind in ("str", "int", "bool", "symint"), self.kind
        assert (self.size_of is not None) == (self.kind == "symint"), self.name


@dataclass(eq=False)
class Local(_Named):
    """A local of the backward, set by ``Set`` (C++: declared at the top of the body)."""
    name: str
    kind: str = "tensor"


@dataclass(eq=False)
class GradOf(Expr):
    """The gradient of output ``name`` (Python None or C++ undefined when autograd gives
    none)."""
    name: str

    def py(self) -> str:
        return f"g_{self.name}"

    cpp = py


@dataclass(eq=False)
class Needs(Expr):
    """Autograd wants the gradient of op argument ``name`` (Python ``ctx.needs_input_grad``;
    C++ from the argument's autograd edge: the renderers compute ``needs_<name>`` first)."""
    name: str
    kind = "bool"

    def py(self) -> str:
        return f"needs_{self.name}"

    cpp = py


@dataclass(eq=False)
class Const(Expr):
    """An int; ``cpp_name`` names the C++ constant that holds it (else the literal)."""
    number: int
    cpp_name: str = ""
    kind = "int"

    def py(self) -> str:
        return str(self.number)

    def cpp(self) -> str:
        return self.cpp_name or str(self.number)


@dataclass(eq=False)
class Dtype(Expr):
    """A dtype constant (C++: the at::ScalarType constant of check_expr.CPP_DTYPES)."""
    dtype: torch.dtype
    kind = "dtype"

    def py(self) -> str:
        return str(self.dtype)  # torch.float32

    def cpp(self) -> str:
        return CPP_DTYPES[self.dtype]


class _NoTensor(Expr):
    """None for an optional tensor argument of an op call (C++ ``std::nullopt``)."""

    def py(self) -> str:
        return "None"

    def cpp(self) -> str:
        return "std::nullopt"


NO_TENSOR = _NoTensor()


# ---- operations ----------------------------------------------------------------------------

class Method(Expr):
    """``t.<name>(args)`` in both languages (int arguments as literals)."""

    def __init__(self, obj: Expr, name: str, *args: Operand) -> None:
        self.obj, self.name, self.args = obj, name, args

    def py(self) -> str:
        return f"{self.obj.py()}.{self.name}({', '.join(_py(a) for a in self.args)})"

    def cpp(self) -> str:
        return f"{self.obj.cpp()}.{self.name}({', '.join(_cpp(a) for a in self.args)})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.obj, *_nodes(*self.args))


class Func(Expr):
    """``torch.<name>(args)`` / ``at::<name>(args)``."""

    def __init__(self, name: str, *args: Expr) -> None:
        assert callable(getattr(torch, name, None)), name
        self.name, self.args = name, args

    def py(self) -> str:
        return f"torch.{self.name}({', '.join(a.py() for a in self.args)})"

    def cpp(self) -> str:
        return f"at::{self.name}({', '.join(a.cpp() for a in self.args)})"

    def parts(self) -> tuple[Expr, ...]:
        return self.args


def where(cond: Expr, a: Expr, b: Expr) -> Expr:
    return Func("where", cond, a, b)


def zeros_like(t: Expr) -> Expr:
    return Func("zeros_like", t)


@dataclass(eq=False)
class NewZeros(Expr):
    """Zeros of ``sizes`` with the dtype and device of ``like`` (Python ``like.new_zeros``)."""
    like: Expr
    sizes: tuple[Expr, ...]

    def py(self) -> str:
        return f"{self.like.py()}.new_zeros(({', '.join(s.py() for s in self.sizes)},))"

    def cpp(self) -> str:
        sizes = ", ".join(s.cpp() for s in self.sizes)
        return f"at::zeros_symint({{{sizes}}}, {self.like.cpp()}.options())"

    def parts(self) -> tuple[Expr, ...]:
        return (self.like, *self.sizes)


@dataclass(eq=False)
class Size(Expr):
    """A tensor's size along ``dim`` (C++ a SymInt)."""
    tensor: Expr
    dim: int
    kind = "symint"

    def py(self) -> str:
        return f"{self.tensor.py()}.shape[{self.dim}]"

    def cpp(self) -> str:
        return f"{self.tensor.cpp()}.sym_size({self.dim})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.tensor,)


@dataclass(eq=False)
class LastRows(Expr):
    """The last ``count`` rows of a tensor (Python ``t[t.shape[0] - count:]``)."""
    tensor: Expr
    count: Expr

    def py(self) -> str:
        t = self.tensor.py()
        return f"{t}[{t}.shape[0] - {self.count.py()}:]"

    def cpp(self) -> str:
        t = self.tensor.cpp()
        return f"{t}.slice_symint(0, {t}.sym_size(0) - {self.count.cpp()})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.tensor, self.count)


@dataclass(eq=False)
class DtypeOf(Expr):
    tensor: Expr
    kind = "dtype"

    def py(self) -> str:
        return f"{self.tensor.py()}.dtype"

    def cpp(self) -> str:
        return f"{self.tensor.cpp()}.scalar_type()"

    def parts(self) -> tuple[Expr, ...]:
        return (self.tensor,)


@dataclass(eq=False)
class Defined(Expr):
    """The tensor is there (Python: not None; C++: defined)."""
    tensor: Expr
    kind = "bool"

    def py(self) -> str:
        return f"{self.tensor.py()} is not None"

    def cpp(self) -> str:
        return f"{self.tensor.cpp()}.defined()"

    def parts(self) -> tuple[Expr, ...]:
        return (self.tensor,)


@dataclass(eq=False)
class Binary(Expr):
    """``a * b`` (tensors), ``a - b`` (sizes), ``a == b`` (dtypes)."""
    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        assert self.op in ("*", "-", "=="), self.op
        self.kind = "bool" if self.op == "==" else self.a.kind

    def py(self) -> str:
        return f"({self.a.py()} {self.op} {self.b.py()})"

    def cpp(self) -> str:
        return f"({self.a.cpp()} {self.op} {self.b.cpp()})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.a, self.b)


@dataclass(eq=False)
class And(Expr):
    """``and`` / ``&&`` (short-circuit in both languages)."""
    a: Expr
    b: Expr
    kind = "bool"

    def py(self) -> str:
        return f"{self.a.py()} and {self.b.py()}"

    def cpp(self) -> str:
        return f"{self.a.cpp()} && {self.b.cpp()}"

    def parts(self) -> tuple[Expr, ...]:
        return (self.a, self.b)


@dataclass(eq=False)
class Cond(Expr):
    """``a if cond else b`` / ``cond ? a : b``."""
    cond: Expr
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        assert self.a.kind == self.b.kind, (self.a.kind, self.b.kind)
        self.kind = self.a.kind

    def py(self) -> str:
        return f"({self.a.py()} if {self.cond.py()} else {self.b.py()})"

    def cpp(self) -> str:
        return f"({self.cond.cpp()} ? {self.a.cpp()} : {self.b.cpp()})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.cond, self.a, self.b)


class OpCall(Expr):
    """A ``deep_ep`` op through the dispatcher, with autograd (so double backward, compile and
    capture see the same graph as the forward): ``_ops.<op>(args)`` (``torch.ops.deep_ep``) /
    ``<op>_op().call(args)`` (csrc/torch/op_handles.hpp)."""

    def __init__(self, op: str, *args: Expr, outputs: int = 1) -> None:
        self.op, self.args = op, args
        self.kind = "tensor" if outputs == 1 else "tuple"

    def py(self) -> str:
        return f"_ops.{self.op}({', '.join(a.py() for a in self.args)})"

    def cpp(self) -> str:
        return f"{self.op.lstrip('_')}_op().call({', '.join(a.cpp() for a in self.args)})"

    def parts(self) -> tuple[Expr, ...]:
        return self.args


@dataclass(eq=False)
class Item(Expr):
    """Output ``index`` of an op that returns several (Python ``v[i]``, C++ ``std::get<i>``)."""
    of: Expr
    index: int

    def __post_init__(self) -> None:
        assert self.of.kind == "tuple", "only op calls with several outputs are indexed"

    def py(self) -> str:
        return f"{self.of.py()}[{self.index}]"

    def cpp(self) -> str:
        return f"std::get<{self.index}>({self.of.cpp()})"

    def parts(self) -> tuple[Expr, ...]:
        return (self.of,)


# ---- statements ----------------------------------------------------------------------------

class Stmt:
    def py_lines(self) -> list[str]:
        raise NotImplementedError

    def cpp_lines(self) -> list[str]:
        raise NotImplementedError

    def exprs(self) -> tuple[Expr, ...]:
        """The expressions this statement reads (not those of nested statements)."""
        return ()

    def children(self) -> tuple[Stmt, ...]:
        return ()


@dataclass(eq=False)
class Set(Stmt):
    """``local = expr``."""
    local: Local
    expr: Expr

    def __post_init__(self) -> None:
        assert self.local.kind == self.expr.kind, (self.local.name, self.expr.kind)

    def py_lines(self) -> list[str]:
        return [f"{self.local.py()} = {self.expr.py()}"]

    def cpp_lines(self) -> list[str]:
        return [f"{self.local.cpp()} = {self.expr.cpp()};"]

    def exprs(self) -> tuple[Expr, ...]:
        return (self.expr,)


@dataclass(eq=False)
class Grad(Stmt):
    """The gradient of op argument ``name`` is ``expr`` (the local ``grad_<name>``)."""
    name: str
    expr: Expr

    def py_lines(self) -> list[str]:
        return [f"grad_{self.name} = {self.expr.py()}"]

    def cpp_lines(self) -> list[str]:
        return [f"grad_{self.name} = {self.expr.cpp()};"]

    def exprs(self) -> tuple[Expr, ...]:
        return (self.expr,)


@dataclass(eq=False)
class When(Stmt):
    """``if cond: then else: otherwise``."""
    cond: Expr
    then: tuple[Stmt, ...]
    otherwise: tuple[Stmt, ...] = field(default=())

    def __post_init__(self) -> None:
        assert self.cond.kind == "bool" and self.then, self.cond

    def py_lines(self) -> list[str]:
        lines = [f"if {self.cond.py()}:"]
        lines += ["    " + ln for s in self.then for ln in s.py_lines()]
        if self.otherwise:
            lines.append("else:")
            lines += ["    " + ln for s in self.otherwise for ln in s.py_lines()]
        return lines

    def cpp_lines(self) -> list[str]:
        lines = [f"if ({self.cond.cpp()}) {{"]
        lines += ["  " + ln for s in self.then for ln in s.cpp_lines()]
        if self.otherwise:
            lines.append("} else {")
            lines += ["  " + ln for s in self.otherwise for ln in s.cpp_lines()]
        return lines + ["}"]

    def exprs(self) -> tuple[Expr, ...]:
        return (self.cond,)

    def children(self) -> tuple[Stmt, ...]:
        return self.then + self.otherwise


def statements(body: tuple[Stmt, ...]) -> list[Stmt]:
    """Every statement of a body, nested ones included, in order."""
    out: list[Stmt] = []
    for stmt in body:
        out.append(stmt)
        out += statements(stmt.children())
    return out


def walk_exprs(body: tuple[Stmt, ...]) -> list[Expr]:
    """Every expression node of a body, each once, in order."""
    seen: dict[int, Expr] = {}

    def visit(node: Expr) -> None:
        if id(node) not in seen:
            seen[id(node)] = node
            for part in node.parts():
                visit(part)

    for stmt in statements(body):
        for e in stmt.exprs():
            visit(e)
    return list(seen.values())
