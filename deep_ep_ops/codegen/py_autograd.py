"""Renders the Python autograd kernels of deep_ep_ops/autograd_formulas.py: per formula the
source of ``<op>_setup(ctx, inputs, output)`` and ``<op>_backward(ctx, *grads)`` for
``torch.library.register_autograd``. deep_ep_ops/autograd.py compiles it once at import (no
build step; CPU-only installs have no C++), the C++ rendering of the same table is
codegen/ep_autograd.py.

Python numbers ``needs_input_grad`` by argument position (C++ by autograd edge) and returns one
gradient or None per argument.
"""
from __future__ import annotations

import linecache
from typing import Callable

import torch

from deep_ep_ops.autograd_formulas import Formula

# Names the rendered code reads besides its own variables.
_GLOBALS = ("torch", "_ops")


def _name(f: Formula) -> str:
    return f.op.lstrip("_")


def render(f: Formula) -> str:
    """The Python source of ``f``'s setup_context and backward."""
    several = len(f.outputs) > 1

    def source(name: str) -> str:
        if name in f.output_index:
            return f"output[{f.output_index[name]}]" if several else "output"
        return f"inputs[{f.positions[name]}]"

    names = [s.name for s in f.save] + [k.name for k in f.keep] + \
        [loc.name for loc in f.locals()]
    assert not set(names) & set(_GLOBALS), f"{f.op}: a name hides {_GLOBALS}"
    lines = [f"# deep_ep.{f.op}: rendered from deep_ep_ops/autograd_formulas.py",
             f"def {_name(f)}_setup(ctx, inputs, output):",
             f"    ctx.save_for_backward({', '.join(source(s.name) for s in f.save)})"]
    for k in f.keep:
        read = source(k.name) if k.size_of is None else \
            f"{source(k.size_of[0])}.shape[{k.size_of[1]}]"
        lines.append(f"    ctx.{k.name} = {read}")
    lines += ["", "",
              f"def {_name(f)}_backward(ctx, {', '.join('g_' + o for o in f.outputs)}):",
              f"    {''.join(s.name + ', ' for s in f.save)}= ctx.saved_tensors"]
    lines += [f"    {k.name} = ctx.{k.name}" for k in f.keep]
    lines += [f"    needs_{n} = ctx.needs_input_grad[{f.positions[n]}]" for n in f.needed()]
    lines.append(f"    {' = '.join('grad_' + g for g in f.graded())} = None")
    lines += ["    " + ln for stmt in f.body for ln in stmt.py_lines()]
    graded = set(f.graded())
    result = ", ".join(f"grad_{a.name}" if a.name in graded else "None" for a in f.args)
    return "\n".join(lines + [f"    return {result}", ""])


def compile_formula(f: Formula) -> tuple[Callable, Callable]:
    """``(backward, setup_context)`` of ``f``, compiled from its rendering. The source is
    registered with linecache, so tracebacks and debuggers show its lines."""
    text = render(f)
    filename = f"<deep_ep_ops formula {f.op}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace = {"torch": torch, "_ops": torch.ops.deep_ep}
    exec(compile(text, filename, "exec"), namespace)
    return namespace[f"{_name(f)}_backward"], namespace[f"{_name(f)}_setup"]


if __name__ == "__main__":
    from deep_ep_ops.autograd_formulas import FORMULAS
    print("\n\n".join(render(f) for f in FORMULAS), end="")
