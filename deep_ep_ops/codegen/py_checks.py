"""Renders the rules of deep_ep_ops/check_rules.py as Python functions, ``<op>(buf, <the op's
checked arguments>)`` and ``<op>_handle(buf, header, x_rows)`` (the handle-header checks),
which deep_ep_ops/validation.py compiles once at import (the C++ rendering of the same rules is
codegen/ep_checks.py). Same order, same messages; a message is built only on the failing
branch, so a passing call costs the conditions alone.
"""
from __future__ import annotations

import linecache
from string import Formatter
from typing import Callable

from deep_ep_ops import check_rules as R
from deep_ep_ops import handle
from deep_ep_ops.check_expr import Expr, Int


def _string(node: Expr) -> str:
    """Python str of a message value (ints as str, strings as they are)."""
    return node.py() if node.kind == "str" else f"str({node.py()})"


def _text(fmt: str, values: dict[str, Expr]) -> str:
    """Python text of a message part (format string ``fmt`` over ``values``): a literal, or a
    concatenation of strs."""
    parts: list[str] = []
    for literal, name, _, _ in Formatter().parse(fmt):
        if literal:
            parts.append(repr(literal))
        if name is not None:
            parts.append(_string(values[name]))
    return " + ".join(parts)


def _got(rule: R.Rule) -> str:
    arg = rule.arg
    if rule.got is not None:
        return rule.got.py()
    if isinstance(arg, Int):
        return f"repr({arg.name})"
    if arg.optional:
        return f'"None" if {arg.name} is None else _desc({arg.name})'
    return f"_desc({arg.name})"


def render(checks: R.OpChecks) -> str:
    """The source of the Python function of ``checks``."""
    params = ", ".join(["buf"] + [a.name for a in checks.args])
    lines = [f"# deep_ep.{checks.op}: check_rules.{checks.op.upper()}",
             f"def {checks.op}({params}):"]
    for rule in checks.rules:
        lines += [f"    if {rule.fails.py()}:  # {rule.name}",
                  f"        _fail({checks.op!r}, {rule.arg.name!r}, "
                  f"{_text(rule.expected, rule.values)},",
                  f"              {_got(rule)})"]
    return "\n".join(lines + [""])


def render_handle(hc: R.HandleChecks) -> str:
    """The source of the Python function of the header checks ``hc``."""
    lines = [f"# deep_ep.{hc.op}: check_rules.{hc.op.upper()}_HANDLE",
             f"def {hc.op}_handle(buf, header, x_rows):"]
    for check in hc.checks:
        lines += [f"    if {check.fails.py()}:  # {check.name}",
                  f"        raise ValueError("
                  f"{_text(f'deep_ep.{hc.op}: ' + check.message, check.values)})"]
    return "\n".join(lines + [""])


def _sources() -> dict[str, str]:
    """Function name -> source, every function of the rules."""
    out = {checks.op: render(checks) for checks in R.OPS}
    out.update({f"{hc.op}_handle": render_handle(hc) for hc in R.HANDLE_OPS})
    return out


def compile_checks(fail: Callable, desc: Callable) -> dict[str, Callable]:
    """Function name (``<op>``, ``<op>_handle``) -> the compiled function, raising through
    ``fail(op, arg, expected, got)`` with tensors described by ``desc`` (the header checks
    raise their ValueError whole). The source is registered with linecache, so tracebacks show
    its lines."""
    namespace = {"_fail": fail, "_desc": desc, "H": handle}
    namespace.update({c.cpp_fn: c.dtypes for c in R.DTYPE_CLASSES})
    out = {}
    for name, text in _sources().items():
        filename = f"<deep_ep_ops checks {name}>"
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        exec(compile(text, filename, "exec"), namespace)
        out[name] = namespace[name]
    return out


if __name__ == "__main__":
    print("\n\n".join(_sources().values()), end="")
