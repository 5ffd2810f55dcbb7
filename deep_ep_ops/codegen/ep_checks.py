"""Renders ``generated/ep_checks.hpp``: the rules of deep_ep_ops/check_rules.py as C++ functions
``checks::<op>_shapes(buf, group, <the op's checked arguments>)`` for csrc/torch/ep_kernels.cpp,
with the dtype-class predicates and the ``BufferFacts`` the rules read; its value rules as
``checks::<op>_values(<the tensors and ints they read>)``; its handle-header checks
as ``checks::<op>_handle(made, buf, x_rows)`` and ``checks::handle_facts_of(header)`` for
csrc/torch/handle_checks.cpp. Same order, same messages (csrc/torch/check_text.hpp writes them
as validation.py does); strings are built only on the failing branch."""
from __future__ import annotations

from string import Formatter

from deep_ep_ops import check_rules as R
from deep_ep_ops.check_expr import CPP_DTYPES, Expr, GroupRepr, Int
from deep_ep_ops.codegen.handle_layout import cpp_name


def _literal(text: str) -> str:
    assert text.isascii() and "\n" not in text, text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unparen(code: str) -> str:
    """``(a != b)`` -> ``a != b`` when the outer parentheses enclose the whole text."""
    if not (code.startswith("(") and code.endswith(")")):
        return code
    depth = 0
    for i, c in enumerate(code):
        depth += c == "("
        depth -= c == ")"
        if depth == 0 and i < len(code) - 1:
            return code
    return code[1:-1]


def _string(node: Expr) -> str:
    """C++ std::string of a message value (ints as Python's str, strings as they are)."""
    return node.cpp() if node.kind == "str" else f"std::to_string({_unparen(node.cpp())})"


def _text(fmt: str, values: dict[str, Expr]) -> str:
    """C++ text of a message part (format string ``fmt`` over ``values``): a literal, or a
    concatenation of std::strings."""
    parts: list[str] = []
    for literal, name, _, _ in Formatter().parse(fmt):
        if literal:
            parts.append(_literal(literal))
        if name is not None:
            parts.append(_string(values[name]))
    if len(parts) == 1 and parts[0].startswith('"'):
        return parts[0]
    if parts[0].startswith('"'):
        parts[0] = f"std::string({parts[0]})"
    return " + ".join(parts)


def _got(rule: R.Rule) -> str:
    arg = rule.arg
    if rule.got is not None:
        return rule.got.cpp()
    if isinstance(arg, Int):
        return f"std::to_string({arg.name})"
    if arg.optional:
        return f'{arg.name} == nullptr ? std::string("None") : desc(*{arg.name})'
    return f"desc({arg.name})"


def _reads_group(checks: R.OpChecks) -> bool:
    return any(isinstance(v, GroupRepr) for r in checks.rules for v in r.values.values())


def _function(checks: R.OpChecks) -> list[str]:
    params = ["const BufferFacts& buf",
              ("" if _reads_group(checks) else "[[maybe_unused]] ") + "c10::string_view group"]
    params += [f"{a.cpp_type()} {a.name}" for a in checks.args]
    lines = [f"// deep_ep.{checks.op}: check_rules.{checks.op.upper()}",
             f"inline void {checks.op}_shapes({', '.join(params)}) {{",
             f'  const char* op = "{checks.op}";']
    for rule in checks.rules:
        lines += [f"  // {rule.name}",
                  f"  if ({_unparen(rule.fails.cpp())})",
                  f'    fail(op, "{rule.arg.name}", {_text(rule.expected, rule.values)},',
                  f"         {_got(rule)});"]
    return lines + ["}", ""]


def _entry_rule(op: str, rule: R.EntryRule) -> list[str]:
    t = rule.arg.name
    return [f"  {{  // {rule.name}",
            f"    const int64_t* v = {t}_host.const_data_ptr<int64_t>();",
            f"    const int64_t cols = {t}_host.size(1);",
            f"    for (int64_t i = 0; i < {t}_host.numel(); ++i)",
            f"      if ({_unparen(rule.fails.cpp())})",
            f'        fail(op, "{t}", {_text(rule.expected, rule.values)},',
            f'             "{t}[" + std::to_string(i / cols) + ", " + std::to_string(i % cols) + '
            f'"] = " + std::to_string(v[i]));',
            "  }"]


def _unique_rows(op: str, rule: R.UniqueRows) -> list[str]:
    t = rule.arg.name
    return [f"  {{  // {rule.name}",
            f"    const int64_t* v = {t}_host.const_data_ptr<int64_t>();",
            f"    const int64_t rows = {t}_host.size(0), cols = {t}_host.size(1);",
            "    for (int64_t r = 0; r < rows; ++r)",
            "      for (int64_t a = 0; a < cols; ++a)",
            "        for (int64_t b = a + 1; b < cols; ++b)",
            f"          if (v[r * cols + a] >= {rule.low} && v[r * cols + a] == v[r * cols + b])",
            f'            fail(op, "{t}", {_text(rule.expected, rule.values)},',
            '                 "row " + std::to_string(r) + " = " + py_list(v + r * cols, cols));',
            "  }"]


def _values_function(vc: R.ValueChecks) -> list[str]:
    params = ", ".join(f"{a.cpp_type()} {a.name}" for a in vc.args)
    lines = [f"// deep_ep.{vc.op}: check_rules.{vc.op.upper()}_VALUES. They read the data: one "
             "host copy (int64) of each tensor.",
             f"inline void {vc.op}_values({params}) {{",
             f'  const char* op = "{vc.op}";']
    for name in dict.fromkeys(r.arg.name for r in vc.rules):
        lines.append(f"  const at::Tensor {name}_host = "
                     f"{name}.to(at::kCPU).to(at::kLong).contiguous();")
    for rule in vc.rules:
        lines += _entry_rule(vc.op, rule) if isinstance(rule, R.EntryRule) else \
            _unique_rows(vc.op, rule)
    return lines + ["}", ""]


def _handle_function(hc: R.HandleChecks) -> list[str]:
    lines = [f"// deep_ep.{hc.op}: check_rules.{hc.op.upper()}_HANDLE",
             f"inline void {hc.op}_handle(const HandleFacts& made, const BufferIdentity& buf, "
             f"int64_t x_rows) {{",
             "  const c10::string_view group = buf.group;"]
    for check in hc.checks:
        lines += [f"  // {check.name}",
                  f"  if ({_unparen(check.fails.cpp())})",
                  f"    value_error({_text(f'deep_ep.{hc.op}: ' + check.message, check.values)});"]
    return lines + ["}", ""]


def _handle_facts_of() -> list[str]:
    fields = ", ".join(f".{f.name} = header[handle::{cpp_name(f.column)}]"
                       for f in R.HEADER_FIELDS)
    return ["// What a handle's header row holds (check_rules.HEADER_FIELDS).",
            "inline HandleFacts handle_facts_of(const int32_t* header) {",
            f"  return HandleFacts{{{fields}}};", "}", ""]


def _dtype_predicate(cls: R.DtypeClass) -> str:
    tests = " || ".join(f"t == {CPP_DTYPES[d]}" for d in cls.dtypes)
    return f"inline bool {cls.cpp_fn}(at::ScalarType t) {{ return {tests}; }}"


def render() -> str:
    lines = [
        "// GENERATED from deep_ep_ops/check_rules.py by deep_ep_ops/codegen/ep_checks.py; the",
        "// build writes it, do not edit. The input checks of the EP ops (shape, dtype, range,",
        "// device, contiguity, the handle's header), in the order and with the messages of",
        "// deep_ep_ops/validation.py, which runs the same rules.",
        "#pragma once",
        "",
        "#include <ATen/core/Tensor.h>",
        "#include <c10/util/string_view.h>",
        "",
        "#include <cstdint>",
        "#include <string>",
        "",
        '#include "generated/handle_layout.hpp"',
        '#include "torch/check_text.hpp"',
        '#include "torch/handle_checks.hpp"',
        "",
        "namespace deep_ep_ops {",
        "namespace checks {",
        "",
        "// dtype classes",
    ]
    lines += [_dtype_predicate(c) for c in R.DTYPE_CLASSES]
    lines += ["", "// What the checks read of the Buffer.", "struct BufferFacts {"]
    lines += [f"  {f.cpp_type()} {f.name};" for f in R.FACTS]
    lines += ["};", "",
              "// The facts of an EP state (EpState; a template, so this header needs none).",
              "template <class State>",
              "inline BufferFacts buffer_facts(const State& st) {",
              f"  return BufferFacts{{{', '.join(f.cpp_source for f in R.FACTS)}}};",
              "}", ""]
    for checks in R.OPS:
        lines += _function(checks)
    for vc in R.VALUE_OPS:
        lines += _values_function(vc)
    lines += ["// The handle's header: checks and what they read.", ""] + _handle_facts_of()
    for hc in R.HANDLE_OPS:
        lines += _handle_function(hc)
    lines += ["}  // namespace checks", "}  // namespace deep_ep_ops", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
