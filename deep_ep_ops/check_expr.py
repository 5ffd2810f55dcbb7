"""The vocabulary of the EP ops' input checks (deep_ep_ops/check_rules.py).

Each node has two spellings side by side: ``py()``, the Python expression that
deep_ep_ops/codegen/py_checks.py renders into the check functions deep_ep_ops/validation.py
compiles at import, and ``cpp()``, the C++ expression deep_ep_ops/codegen/ep_checks.py renders
for the CUDA kernels. A rule written with these nodes is therefore one text for both languages.
In the rendered code the Buffer is ``buf``, every checked argument has its own name, and the
group name is ``group`` (C++) or ``buf.group_name`` (Python).

Conditions combine with ``&``, ``|`` and ``~`` (Python's ``and``/``or``/``not`` cannot be
overloaded); like ``&&``/``||``, ``&`` and ``|`` stop at the first operand that decides. Mind the
precedence: write ``(x.dim() != 2) | ...``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch


class Expr:
    """A node of a check: its Python and C++ text."""

    kind = "int"  # "int", "bool" or "str": how a message prints it

    def py(self) -> str:
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

    def py(self) -> str:
        return str(self.number)

    def cpp(self) -> str:
        return self.cpp_name or str(self.number)


def lift(x: Operand) -> Expr:
    return x if isinstance(x, Expr) else Const(int(x))


@dataclass(eq=False)
class Binary(Expr):
    op: str
    a: Expr
    b: Expr

    def __post_init__(self) -> None:
        assert self.op in ("==", "!=", "<", "<=", ">", ">=", "+", "-", "//"), self.op
        self.kind = "int" if self.op in ("+", "-", "//") else "bool"

    def py(self) -> str:
        return f"({self.a.py()} {self.op} {self.b.py()})"

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

    def py(self) -> str:
        word = " and " if self.op == "&&" else " or "
        return f"({self.a.py()}{word}{self.b.py()})"

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

    def py(self) -> str:
        return f"(not {self.a.py()})"

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
    """A set of dtypes; C++ gets a predicate ``bool <cpp_fn>(at::ScalarType)`` rendered from it,
    Python a global of that name holding the dtypes."""
    cpp_fn: str
    dtypes: tuple[torch.dtype, ...]


# ---- the call's arguments and the Buffer's facts -------------------------------------------

@dataclass(eq=False)
class Tensor(Expr):
    """A tensor argument (``optional``: ``Tensor?``, C++ ``const at::Tensor*``, nullptr for
    None). The checks read it through the methods below."""
    name: str
    optional: bool = False

    def py(self) -> str:
        return self.name

    def cpp(self) -> str:
        return self.name

    def args(self) -> set[str]:
        return {self.name}

    def _member(self) -> str:
        return f"{self.name}->" if self.optional else f"{self.name}."

    def dim(self) -> Expr:
        return Call(self, lambda t: f"{t}.dim()", lambda m: f"{m}dim()")

    def size(self, i: int) -> Expr:
        return Call(self, lambda t: f"{t}.shape[{i}]", lambda m: f"{m}size({i})")

    def is_cuda(self) -> Expr:
        return Call(self, lambda t: f"{t}.is_cuda", lambda m: f"{m}is_cuda()", "bool")

    def is_meta(self) -> Expr:
        return Call(self, lambda t: f"{t}.is_meta", lambda m: f"{m}is_meta()", "bool")

    def is_contiguous(self) -> Expr:
        return Call(self, lambda t: f"{t}.is_contiguous()", lambda m: f"{m}is_contiguous()",
                    "bool")

    def strides(self) -> Expr:
        return Strides(self)

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
class OfTensor(Expr):
    """A node that reads one tensor argument (its ``args`` is that tensor's name)."""
    tensor: Tensor

    def args(self) -> set[str]:
        return {self.tensor.name}


@dataclass(eq=False)
class Call(OfTensor):
    """A property of a tensor argument (dim, a size, where it is): ``py_of(name)`` and
    ``cpp_of(member access)`` give its texts."""
    py_of: Callable[[str], str]
    cpp_of: Callable[[str], str]
    kind: str = "int"

    def py(self) -> str:
        return self.py_of(self.tensor.name)

    def cpp(self) -> str:
        return self.cpp_of(self.tensor._member())


@dataclass(eq=False)
class Strides(OfTensor):
    """``strides <Python's tuple of the strides>``: what a rule on the memory layout shows."""
    kind = "str"

    def py(self) -> str:
        return f'("strides " + str({self.tensor.name}.stride()))'

    def cpp(self) -> str:
        return f'"strides " + py_tuple({self.tensor._member()}strides())'


@dataclass(eq=False)
class DtypeIs(OfTensor):
    cls: DtypeClass
    kind = "bool"

    def py(self) -> str:
        return f"({self.tensor.name}.dtype in {self.cls.cpp_fn})"

    def cpp(self) -> str:
        return f"{self.cls.cpp_fn}({self.tensor._member()}scalar_type())"


@dataclass(eq=False)
class Given(OfTensor):
    """An optional tensor is not None."""
    kind = "bool"

    def py(self) -> str:
        return f"({self.tensor.name} is not None)"

    def cpp(self) -> str:
        return f"({self.tensor.name} != nullptr)"


@dataclass(eq=False)
class Int(Expr):
    """An int argument (C++ ``int64_t``)."""
    name: str

    def py(self) -> str:
        return self.name

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

    def py(self) -> str:
        return f"(not isinstance({self.arg.name}, int))"

    def cpp(self) -> str:
        return "false"

    def args(self) -> set[str]:
        return {self.arg.name}


@dataclass(eq=False)
class Fact(Expr):
    """A fact of the call's Buffer (``kind``: an int, a bool or a str): in Python
    ``py_source``, an expression of ``buf`` (the Buffer) and ``H`` (deep_ep_ops.handle); in C++
    the field ``name`` of the rendered ``BufferFacts`` struct, filled from the EP state as
    ``cpp_source`` (an expression of ``st``)."""
    name: str
    py_source: str
    cpp_source: str
    kind: str = "int"

    def __post_init__(self) -> None:
        self._code = compile(self.py_source, f"<fact {self.name}>", "eval")

    def py(self) -> str:
        return f"({self.py_source})"

    def cpp(self) -> str:
        return f"buf.{self.name}"

    def of(self, buf: Any) -> Any:
        """The fact's value for ``buf`` (what the rendered C++ gets in BufferFacts)."""
        from deep_ep_ops import handle
        return eval(self._code, {"buf": buf, "H": handle})

    def cpp_type(self) -> str:
        return {"int": "int64_t", "bool": "bool", "str": "const char*"}[self.kind]


@dataclass(eq=False)
class GroupRepr(Expr):
    """``repr`` of the call's group name (C++: ``py_repr`` of the ``group`` argument)."""
    kind = "str"

    def py(self) -> str:
        return "repr(buf.group_name)"

    def cpp(self) -> str:
        return "py_repr(group)"


@dataclass(eq=False)
class HeaderField(Expr):
    """A field of the handle's header, by deep_ep_ops.handle's constant ``column`` (``HDR_*``):
    Python reads the header row (``header``, a list of ints); C++ the field ``name`` of
    ``made``, the HandleFacts of csrc/torch/handle_checks.hpp (read from the header or from the
    host-side record of the dispatch that made the handle)."""
    name: str
    column: str

    def __post_init__(self) -> None:
        from deep_ep_ops import handle
        assert isinstance(getattr(handle, self.column), int), self.column

    def py(self) -> str:
        return f"header[H.{self.column}]"

    def cpp(self) -> str:
        return f"made.{self.name}"


# ---- the entries of a tensor (value checks: they read the data) ----------------------------

@dataclass(eq=False)
class Entry(OfTensor):
    """Each entry of an int tensor argument, as an int64: Python the tensor itself (the
    conditions run elementwise on it, on its device), C++ ``v[i]``, one entry of its host copy
    (the rendered loop's)."""

    def py(self) -> str:
        return self.tensor.name

    def cpp(self) -> str:
        return "v[i]"


@dataclass(eq=False)
class Either(Expr):
    """``a`` or ``b`` of entry conditions: Python ``|`` (elementwise on tensors), C++ ``||``."""
    a: Expr
    b: Expr
    kind = "bool"

    def py(self) -> str:
        return f"({self.a.py()} | {self.b.py()})"

    def cpp(self) -> str:
        return f"({self.a.cpp()} || {self.b.cpp()})"

    def args(self) -> set[str]:
        return self.a.args() | self.b.args()
