"""The vocabulary of the EP ops' shape / dtype checks (deep_ep_ops/check_rules.py).

Each node has two meanings side by side: ``value(env)``, its Python value for one call, and
``cpp()``, the C++ expression deep_ep_ops/codegen/ep_checks.py renders for the CUDA kernels. A
rule written with these nodes is therefore evaluated by Python and compiled by C++ from one text.

Conditions combine with ``&``, ``|`` and ``~`` (Python's ``and``/``or``/``not`` cannot be
overloaded); like ``&&``/``||``, ``&`` and ``|`` stop at the first operand that decides. Mind the
precedence: write ``(x.dim() != 2) | ...``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

Env = dict[str, Any]  # "buf": the Buffer; every checked argument by name


class Expr:
    """A node of a check: Python value and C++ text."""

    kind = "int"  # "int", "bool" or "str": how a message prints it

    def value(self, env: Env) -> Any:
        raise NotImplementedError

    def cpp(self) -> str:
        raise NotImplementedError

    def args(self) -> set[str]:
        """Names of the call's arguments this node reads."""
        return set()

    # comparisons and arithmetic build nodes (so Expr is not hashable)
    def __eq__(self, other: Operand) -> Expr:  # type: ignore[override]
        return Binary("==", self, lift(other))

    def __ne__(self, other: Operand) -> Expr:  # type: ignore[override]
        return Binary("!=", self, lift(other))

    def __lt__(self, other: Operand) -> Expr:
        return Binary("<", self, lift(other))

    def __le__(self, other: Operand) -> Expr:
        return Binary("<=", self, lift(other))

    def __gt__(self, other: Operand) -> Expr:
        return Binary(">", self, lift(other))

    def __ge__(self, other: Operand) -> Expr:
        return Binary(">=", self, lift(other))

    def __add__(self, other: Operand) -> Expr:
        return Binary("+", self, lift(other))

    def __sub__(self, other: Operand) -> Expr:
        return Binary("-", self, lift(other))

    def __floordiv__(self, other: Operand) -> Expr:
        # C++ '/' truncates and Python '//' floors: equal for the non-negative sizes used here
        return Binary("//", self, lift(other))

    def __and__(self, other: Expr) -> Expr:
        return Logic("&&", self, other)

    def __or__(self, other: Expr) -> Expr:
        return Logic("||", self, other)

    def __invert__(self) -> Expr:
        return Not(self)

    __hash__ = None  # type: ignore[assignment]


Operand = Union[Expr, int]


@dataclass(eq=False)
class Const(Expr):
    """An int; ``cpp_name`` names the C++ constant that holds it (else the literal)."""
    number: int
    cpp_name: str = ""

    def value(self, env: Env) -> int:
        return self.number

    def cpp(self) -> str:
        return self.cpp_name or str(self.number)


def lift(x: Operand) -> Expr:
    return x if isinstance(x, Expr) else Const(int(x))


_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "//": lambda a, b: a // b,
}


@dataclass(eq=False)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        self.kind = "int" if self.op in ("+", "-", "//") else "bool"
        self._fn = _PY_OPS[self.op]

    def value(self, env: Env) -> Any:
        return self._fn(self.a.value(env), self.b.value(env))

    def cpp(self) -> str:
        return f"({self.a.cpp()} {'/' if self.op == '//' else self.op} {self.b.cpp()})"

    def args(self) -> set[str]:
        return self.a.args() | self.b.args()


@dataclass(eq=False)
class Logic(Expr):
    """``&&`` / ``||``, short-circuit in both languages (the right side may read what the left
    one guards, e.g. a tensor that may be None)."""
    op: str
    a: Expr
    b: Expr
    kind = "bool"

    def value(self, env: Env) -> bool:
        first = bool(self.a.value(env))
        if first == (self.op == "||"):
            return first
        return bool(self.b.value(env))

    def cpp(self) -> str:
        sides = self._chain()
        return sides[0] if len(sides) == 1 else f"({f' {self.op} '.join(sides)})"

    def _chain(self) -> list[str]:
        """The operands' texts, a chain of the same operator flattened (``a || b || c``), the
        Python-only ``false`` of an ``||`` left out."""
        sides: list[str] = []
        for node in (self.a, self.b):
            if isinstance(node, Logic) and node.op == self.op:
                sides += node._chain()
            elif not (self.op == "||" and node.cpp() == "false"):
                sides.append(node.cpp())
        return sides

    def args(self) -> set[str]:
        return self.a.args() | self.b.args()


@dataclass(eq=False)
class Not(Expr):
    a: Expr
    kind = "bool"

    def value(self, env: Env) -> bool:
        return not self.a.value(env)

    def cpp(self) -> str:
        if isinstance(self.a, Given):
            return f"({self.a.tensor.name} == nullptr)"
        return f"!{self.a.cpp()}"

    def args(self) -> set[str]:
        return self.a.args()


# ---- dtype classes -------------------------------------------------------------------------

# C++ names of the dtypes the classes hold (at::ScalarType constants).
CPP_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "at::kHalf", torch.bfloat16: "at::kBFloat16", torch.float32: "at::kFloat",
    torch.float64: "at::kDouble", torch.float8_e4m3fn: "at::kFloat8_e4m3fn",
    torch.int32: "at::kInt", torch.int64: "at::kLong",
}


@dataclass(frozen=True)
class DtypeClass:
    """A set of dtypes; C++ gets a predicate ``bool <cpp_fn>(at::ScalarType)`` rendered from it."""
    cpp_fn: str
    dtypes: tuple[torch.dtype, ...]


# ---- the call's arguments and the Buffer's facts -------------------------------------------

@dataclass(eq=False)
class Tensor(Expr):
    """A tensor argument (``optional``: ``Tensor?``, C++ ``const at::Tensor*``, nullptr for
    None). Its own value is the tensor; the checks read it through the methods below."""
    name: str
    optional: bool = False

    def value(self, env: Env) -> Any:
        return env[self.name]

    def cpp(self) -> str:
        return self.name

    def args(self) -> set[str]:
        return {self.name}

    def _member(self) -> str:
        return f"{self.name}->" if self.optional else f"{self.name}."

    def dim(self) -> Expr:
        return Call(self, lambda t: t.dim(), lambda m: f"{m}dim()")

    def size(self, i: int) -> Expr:
        return Call(self, lambda t: t.shape[i], lambda m: f"{m}size({i})")

    def dtype_in(self, *classes: DtypeClass) -> Expr:
        node: Expr = DtypeIs(self, classes[0])
        for c in classes[1:]:
            node = node | DtypeIs(self, c)
        return node

    def given(self) -> Expr:
        assert self.optional, f"{self.name} is not optional"
        return Given(self)

    def cpp_type(self) -> str:
        return "const at::Tensor*" if self.optional else "const at::Tensor&"


@dataclass(eq=False)
class Call(Expr):
    """A property of a tensor argument (dim, a size)."""
    tensor: Tensor
    py: Callable[[Any], Any]
    cpp_of: Callable[[str], str]

    def value(self, env: Env) -> Any:
        return self.py(self.tensor.value(env))

    def cpp(self) -> str:
        return self.cpp_of(self.tensor._member())

    def args(self) -> set[str]:
        return {self.tensor.name}


@dataclass(eq=False)
class DtypeIs(Expr):
    tensor: Tensor
    cls: DtypeClass
    kind = "bool"

    def value(self, env: Env) -> bool:
        return self.tensor.value(env).dtype in self.cls.dtypes

    def cpp(self) -> str:
        return f"{self.cls.cpp_fn}({self.tensor._member()}scalar_type())"

    def args(self) -> set[str]:
        return {self.tensor.name}


@dataclass(eq=False)
class Given(Expr):
    """An optional tensor is not None."""
    tensor: Tensor
    kind = "bool"

    def value(self, env: Env) -> bool:
        return self.tensor.value(env) is not None

    def cpp(self) -> str:
        return f"({self.tensor.name} != nullptr)"

    def args(self) -> set[str]:
        return {self.tensor.name}


@dataclass(eq=False)
class Int(Expr):
    """An int argument (C++ ``int64_t``)."""
    name: str

    def value(self, env: Env) -> Any:
        return env[self.name]

    def cpp(self) -> str:
        return self.name

    def args(self) -> set[str]:
        return {self.name}

    def cpp_type(self) -> str:
        return "int64_t"

    def not_int(self) -> Expr:
        return NotInt(self)


@dataclass(eq=False)
class NotInt(Expr):
    """Python only: the value is not a Python int (C++ has an ``int64_t``: always false)."""
    arg: Int
    kind = "bool"

    def value(self, env: Env) -> bool:
        return not isinstance(self.arg.value(env), int)

    def cpp(self) -> str:
        return "false"

    def args(self) -> set[str]:
        return {self.arg.name}


@dataclass(eq=False)
class Fact(Expr):
    """An int fact of the call's Buffer: ``py(buf)`` in Python; in C++ the field ``name`` of the
    rendered ``BufferFacts`` struct, filled from the EP state as ``cpp_source``
    (an expression of ``st``)."""
    name: str
    py: Callable[[Any], int]
    cpp_source: str

    def value(self, env: Env) -> int:
        return self.py(env["buf"])

    def cpp(self) -> str:
        return f"buf.{self.name}"


@dataclass(eq=False)
class GroupRepr(Expr):
    """``repr`` of the call's group name (C++: ``py_repr`` of the ``group`` argument)."""
    kind = "str"

    def value(self, env: Env) -> str:
        return repr(env["buf"].group_name)

    def cpp(self) -> str:
        return "py_repr(group)"
