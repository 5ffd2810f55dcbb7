"""Renders ``generated/ep_autograd_formulas.hpp``: the formulas of
deep_ep_ops/autograd_formulas.py as C++ autograd kernels, one ``torch::autograd::Function`` and
one kernel function ``<op>_autograd`` per formula, and ``register_all(lib)``, which
csrc/torch/ep_autograd.cpp calls to register them (AutogradCUDA in production).

The forward saves and keeps what the formula says, the backward runs its body; gradients of
the arguments come back in argument order, as the Python formulas (deep_ep_ops/autograd.py)
return them. C++ sees autograd edges for tensor arguments only (an optional one given as None
has none), so ``needs_<arg>`` is computed from the edge index, which the forward records when
an optional tensor before it decides it.
"""
from __future__ import annotations

from deep_ep_ops import autograd_formulas as AF
from deep_ep_ops.formula_expr import CPP_TYPES

# C++ parameter types of the schema's argument kinds
_PARAM_TYPES = {"tensor": "const at::Tensor&", "tensor?": "const std::optional<at::Tensor>&",
                "str": "c10::string_view", "int": "int64_t", "bool": "bool"}
# how the forward stores a kept value, and how the backward reads it back
_KEEP_READ = {"str": ("std::string&", "toStringRef()"), "int": ("int64_t", "toInt()"),
              "bool": ("bool", "toBool()"), "symint": ("c10::SymInt", "toSymInt()")}

_AC = "torch::autograd::AutogradContext"
_VL = "torch::autograd::variable_list"


def _camel(op: str) -> str:
    """_dispatch_static -> DispatchStatic."""
    return "".join(p.capitalize() for p in op.split("_") if p)


def _handle(op: str) -> str:
    """The op's typed handle in csrc/torch/op_handles.hpp."""
    return f"{op.lstrip('_')}_op()"


def _wrap(line: str, width: int = 100) -> list[str]:
    """A long rendered line broken after commas, continued 4 columns deeper."""
    if len(line) <= width:
        return [line]
    cont = " " * (len(line) - len(line.lstrip()) + 4)
    parts = line.split(", ")
    out, current = [], parts[0]
    for part in parts[1:]:
        if len(current) + len(part) + 2 >= width:
            out.append(current + ",")
            current = cont + part
        else:
            current += ", " + part
    return out + [current]


class _Edges:
    """Where the autograd edge of each tensor argument is: C++ numbers edges over the tensor
    arguments actually given."""

    def __init__(self, f: AF.Formula) -> None:
        self.f = f
        self.needed = f.needed()
        saved = {s.name for s in f.save}
        # optional tensors whose presence decides an edge (their own, or a later one's)
        self.given: list[str] = []
        for a in f.args:
            if a.kind == "tensor?" and any(f.positions[n] >= f.positions[a.name]
                                           for n in self.needed):
                self.given.append(a.name)
        self.recorded = [g for g in self.given if g not in saved]  # the forward records these

    def given_read(self, name: str) -> str:
        if name in self.recorded:
            return f'ctx->saved_data.at("{name}.given").toBool()'
        return f"{name}.defined()"  # saved: undefined when None

    def needs(self, name: str) -> str:
        before = self.f.args[:self.f.positions[name]]
        fixed = sum(a.kind == "tensor" for a in before)
        edge = str(fixed)
        for a in before:
            if a.kind == "tensor?":
                edge += f" + ({a.name}_given ? 1 : 0)"
        text = f"ctx->needs_input_grad({edge})"
        return f"{name}_given && {text}" if self.f.kind(name) == "tensor?" else text


def _forward(f: AF.Formula, edges: _Edges) -> list[str]:
    params = ", ".join(f"{_PARAM_TYPES[a.kind]} {a.name}" for a in f.args)
    names = ", ".join(a.name for a in f.args)
    several = len(f.outputs) > 1

    def output(i: int) -> str:
        return f"std::get<{i}>(out)" if several else "out"

    def source(name: str) -> str:
        if name in f.output_index:
            return output(f.output_index[name])
        if f.kind(name) == "tensor?":
            return f"{name}.value_or(at::Tensor())"
        return name

    lines = [f"  static {_VL} forward({_AC}* ctx, {params}) {{",
             f"    const auto out = call_below_autograd({_handle(f.op)}, {names});",
             f"    ctx->save_for_backward({{{', '.join(source(s.name) for s in f.save)}}});"]
    for k in f.keep:
        if k.size_of is not None:
            value = f"{k.size_of[0]}.sym_size({k.size_of[1]})"
        elif k.kind == "str":
            value = f"std::string({k.name}.data(), {k.name}.size())"
        else:
            value = k.name
        lines.append(f'    ctx->saved_data["{k.name}"] = {value};')
    for name in edges.recorded:
        lines.append(f'    ctx->saved_data["{name}.given"] = opt({name}) != nullptr;')
    outs = ", ".join(output(i) for i in range(len(f.outputs)))
    return lines + [f"    return {{{outs}}};", "  }"]


def _backward(f: AF.Formula, edges: _Edges) -> list[str]:
    lines = [f"  static {_VL} backward({_AC}* ctx, {_VL} grads) {{",
             f"    const {_VL} saved = ctx->get_saved_variables();"]
    lines += [f"    const at::Tensor& {s.name} = saved[{i}];" for i, s in enumerate(f.save)]
    for k in f.keep:
        ctype, read = _KEEP_READ[k.kind]
        lines.append(f'    const {ctype} {k.name} = ctx->saved_data.at("{k.name}").{read};')
    for name in f.grads_read():
        lines.append(f"    const at::Tensor& g_{name} = grads[{f.output_index[name]}];")
    for name in edges.given:
        lines.append(f"    const bool {name}_given = {edges.given_read(name)};")
    for name in edges.needed:
        lines.append(f"    const bool needs_{name} = {edges.needs(name)};")
    for local in f.locals():
        lines.append(f"    {CPP_TYPES[local.kind]} {local.name}{{}};")
    graded = set(f.graded())
    lines.append(f"    at::Tensor {', '.join('grad_' + g for g in f.graded())};")
    lines += ["    " + ln for stmt in f.body for ln in stmt.cpp_lines()]
    result = ", ".join(f"grad_{a.name}" if a.name in graded else "at::Tensor()" for a in f.args)
    return lines + ["    // one entry per forward argument, the non-tensors included",
                    f"    return {{{result}}};", "  }"]


def _kernel(f: AF.Formula) -> list[str]:
    ret = "at::Tensor" if len(f.outputs) == 1 else \
        f"std::tuple<{', '.join(['at::Tensor'] * len(f.outputs))}>"
    params = ", ".join(f"{_PARAM_TYPES[a.kind]} {a.name}" for a in f.args)
    names = ", ".join(a.name for a in f.args)
    tensors = ", ".join(f"opt({a.name})" if a.kind == "tensor?" else f"&{a.name}"
                        for a in f.args if a.kind.startswith("tensor"))
    outs = ", ".join(f"o[{i}]" for i in range(len(f.outputs)))
    return [f"inline {ret} {f.op.lstrip('_')}_autograd({params}) {{",
            f"  if (!wants_grad({{{tensors}}})) return call_below_autograd({_handle(f.op)}, "
            f"{names});",
            f"  const {_VL} o = {_camel(f.op)}Fn::apply({names});",
            f"  return {{{outs}}};" if len(f.outputs) > 1 else f"  return {outs};",
            "}"]


def _formula(f: AF.Formula) -> list[str]:
    edges = _Edges(f)
    return [f"// ---- deep_ep.{f.op} (autograd_formulas.py)", "",
            f"struct {_camel(f.op)}Fn : torch::autograd::Function<{_camel(f.op)}Fn> {{",
            "  static constexpr bool is_traceable = true;  // backward: dispatcher ops on saved "
            "data only",
            *_forward(f, edges), "",
            *_backward(f, edges),
            "};", "",
            *_kernel(f), ""]


def render() -> str:
    lines = [
        "// GENERATED from deep_ep_ops/autograd_formulas.py by",
        "// deep_ep_ops/codegen/ep_autograd.py; the build writes it, do not edit. The autograd",
        "// kernels of the EP ops: the formulas whose Python rendering deep_ep_ops/autograd.py",
        "// runs for CPU, in C++, so an eager CUDA call never enters Python. Every backward calls",
        "// the ops through the dispatcher (with autograd); a kernel whose inputs want no gradient",
        "// goes straight below autograd (no graph node).",
        "// No mark_non_differentiable: the integer outputs are non-differentiable by dtype, a",
        "// float one stays differentiable as with the Python kernel, and compiled autograd",
        "// asserts on a non-empty non-differentiable set.",
        "#pragma once",
        "",
        "#include <ATen/core/Tensor.h>",
        "#include <torch/autograd.h>",
        "#include <torch/library.h>",
        "",
        "#include <cstdint>",
        "#include <optional>",
        "#include <string>",
        "#include <tuple>",
        "",
        '#include "generated/handle_layout.hpp"',
        '#include "torch/autograd_support.hpp"',
        '#include "torch/op_handles.hpp"',
        "",
        "namespace deep_ep_ops {",
        "namespace autograd_formulas {",
        "",
    ]
    for f in AF.FORMULAS:
        lines += _formula(f)
    lines += ["// Registers every kernel above on `lib` (an IMPL library of namespace deep_ep).",
              "inline void register_all(torch::Library& lib) {"]
    lines += [f'  lib.impl("{f.op}", TORCH_FN({f.op.lstrip("_")}_autograd));'
              for f in AF.FORMULAS]
    lines += ["}", "", "}  // namespace autograd_formulas", "}  // namespace deep_ep_ops", ""]
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


if __name__ == "__main__":
    print(render(), end="")
