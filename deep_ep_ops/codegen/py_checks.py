"""Renders the rules of deep_ep_ops/check_rules.py as Python functions, ``<op>(buf, <the op's
checked arguments>)``, ``<op>_values(...)`` (the value rules) and
``<op>_handle(buf, header, x_rows)`` (the handle-header checks),
which deep_ep_ops/validation.py compiles once at import (the C++ rendering of the same rules is
codegen/ep_checks.py). Same order, same messages; a message is built only on the failing
branch, so a passing call costs the conditions alone.
"""
from __future__ import annotations

import linecache
from string import Formatter
from typing import Callable

import torch

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


def render_values(vc: R.ValueChecks) -> str:
    """The source of the Python function of the value rules ``vc``: each runs elementwise on
    the tensor (on its device), then reads the first failing entry or row."""
    lines = [f"# deep_ep.{vc.op}: check_rules.{vc.op.upper()}_VALUES",
             f"def {vc.op}_values({', '.join(a.name for a in vc.args)}):"]
    assert not {a.name for a in vc.args} & {"bad", "dup", "srt", "t", "k", "torch"}, vc.op
    for rule in vc.rules:
        t = rule.arg.name
        fail = f"_fail({vc.op!r}, {t!r}, {_text(rule.expected, rule.values)},"
        if isinstance(rule, R.EntryRule):
            lines += [f"    bad = {rule.fails.py()}  # {rule.name}",
                      "    if bool(bad.any()):",
                      "        t, k = (int(i) for i in bad.nonzero()[0])",
                      f"        {fail}",
                      f"              {t + '['!r} + str(t) + ', ' + str(k) + '] = ' + "
                      f"str(int({t}[t, k])))"]
        else:
            lines += [f"    srt = {t}.to(torch.int64).sort(dim=1).values  # {rule.name}",
                      f"    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= {rule.low})",
                      "    if bool(dup.any()):",
                      "        t = int(dup.nonzero()[0, 0])",
                      f"        {fail}",
                      f"              'row ' + str(t) + ' = ' + str({t}[t].tolist()))"]
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
    out.update({f"{vc.op}_values": render_values(vc) for vc in R.VALUE_OPS})
    out.update({f"{hc.op}_handle": render_handle(hc) for hc in R.HANDLE_OPS})
    return out


def compile_checks(fail: Callable, desc: Callable) -> dict[str, Callable]:
    """Function name (``<op>``, ``<op>_values``, ``<op>_handle``) -> the compiled function,
    raising through ``fail(op, arg, expected, got)`` with tensors described by ``desc`` (the
    header checks raise their ValueError whole). The source is registered with linecache, so
    tracebacks show its lines."""
    namespace = {"_fail": fail, "_desc": desc, "H": handle, "torch": torch}
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
