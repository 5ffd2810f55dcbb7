"""The EP autograd formulas come from one table, deep_ep_ops/autograd_formulas.py: Python
compiles its rendering (codegen/py_autograd.py) into the kernels of the Autograd key, the C++
build includes its other rendering (generated/ep_autograd_formulas.hpp, codegen/ep_autograd.py),
and csrc/ holds no formula of its own.

Here: the two renderings say the same statements in the same order, the Python kernels are the
compiled ones, and the table refuses a formula that reads what its forward did not store.
tests/test_cpp_autograd_cpu.py builds the C++ one without CUDA and checks that it gives Python's
gradients bit for bit.
"""
from __future__ import annotations

import re

import pytest

from deep_ep_ops import autograd
from deep_ep_ops import autograd_formulas as AF
from deep_ep_ops import codegen, ops
from deep_ep_ops.codegen import ep_autograd, py_autograd
from deep_ep_ops.cuda.loader import csrc_dir
from deep_ep_ops.formula_expr import Grad, GradOf, Keep, Saved, When

FORMULAS = {f.op: f for f in AF.FORMULAS}


def test_the_formulas_are_the_cpp_kernels_ops() -> None:
    """Every op with C++ CUDA kernels has its autograd kernel from the table, and only those."""
    assert tuple(FORMULAS) == ops.CPP_CUDA_OPS
    assert "ep_autograd_formulas.hpp" in codegen.render_all()  # in the build key and folder


@pytest.mark.parametrize("op", list(FORMULAS))
def test_python_kernels_are_the_rendered_ones(op: str) -> None:
    backward, setup = autograd._FORMULAS[op]
    for fn in (backward, setup):
        assert fn.__code__.co_filename == f"<deep_ep_ops formula {op}>"


def _indented(lines: list[str], by: str) -> str:
    return "\n".join(by + ln for ln in lines)


@pytest.mark.parametrize("op", list(FORMULAS))
def test_both_renderings_hold_the_body(op: str) -> None:
    """Each rendering holds the formula's body whole, after what it reads; one gradient (or
    None) per argument in argument order."""
    f = FORMULAS[op]
    py = py_autograd.render(f)
    # undo the C++ renderer's line wrapping (it breaks lines after ", ")
    cpp = re.sub(r",\n +", ", ", ep_autograd.render())
    cpp = cpp.split(f"struct {ep_autograd._camel(op)}Fn")[1].split("\n};")[0]
    assert _indented([ln for st in f.body for ln in st.py_lines()], "    ") in py
    assert _indented([ln for st in f.body for ln in st.cpp_lines()], "    ") in cpp
    grads = [f"grad_{a.name}" if a.name in f.graded() else "" for a in f.args]
    assert f"    return {', '.join(g or 'None' for g in grads)}\n" in py
    assert f"    return {{{', '.join(g or 'at::Tensor()' for g in grads)}}};" in cpp
    for name in f.needed():
        assert f"needs_{name} = ctx.needs_input_grad[{f.positions[name]}]" in py
        assert f"const bool needs_{name} = " in cpp


def test_csrc_holds_no_formula() -> None:
    text = (csrc_dir() / "torch" / "ep_autograd.cpp").read_text()
    for word in ("save_for_backward", "needs_input_grad", "saved_data", "combine_op"):
        assert word not in text, word
    assert '#include "generated/ep_autograd_formulas.hpp"' in text


def test_the_table_refuses_what_the_forward_did_not_store() -> None:
    g = GradOf("out")
    grad_x = Grad("x", AF.combine_rows(g))
    with pytest.raises(AssertionError, match="unsaved handle"):
        AF.Formula("combine", outputs=("out",), save=(), keep=(AF.GROUP_NAME, AF.NUM_SMS),
                   body=(grad_x,))
    with pytest.raises(AssertionError, match="unkept num_sms"):
        AF.Formula("combine", outputs=("out",), save=(AF.HANDLE,), keep=(AF.GROUP_NAME,),
                   body=(grad_x,))
    with pytest.raises(AssertionError, match="for nothing"):
        AF.Formula("combine", outputs=("out",), save=(AF.HANDLE, Saved("x")),
                   keep=(AF.GROUP_NAME, AF.NUM_SMS), body=(grad_x,))
    with pytest.raises(AssertionError, match="no output"):
        AF.Formula("combine", outputs=("out",), save=(AF.HANDLE,),
                   keep=(AF.GROUP_NAME, AF.NUM_SMS),
                   body=(Grad("x", AF.combine_rows(GradOf("recv_x"))),))
    with pytest.raises(AssertionError, match="keeps num_sms"):
        AF.Formula("combine", outputs=("out",), save=(AF.HANDLE,),
                   keep=(AF.GROUP_NAME, Keep("num_sms", "bool")), body=(grad_x,))
    with pytest.raises(AssertionError):
        When(AF.HANDLE, (grad_x,))  # a condition must be a bool
