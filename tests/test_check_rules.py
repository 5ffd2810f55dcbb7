"""The input checks of dispatch, cached_dispatch and combine (shape, dtype, range, device,
contiguity) come from one table, deep_ep_ops/check_rules.py: Python (deep_ep_ops/validation.py)
evaluates it, the C++ kernels compile its rendering (generated/ep_checks.hpp,
deep_ep_ops/codegen/ep_checks.py).

Every rule has a failing example (tests/ep_check_examples.py) with its exact message (the value
rules, which read topk_idx after the other rules passed, included); here each runs through
Python and through the rendered C++ checks built without CUDA (a small torch extension, about a
minute to build on 2 cores, then cached), and both must give that message byte for byte. The
device rules' examples run against a stand-in of the Buffer on CUDA (no GPU here).
tests/gpu/test_errors_gpu.py runs the same examples through the CUDA kernels.
"""
from __future__ import annotations

import re
import shutil
from string import Formatter
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

import deep_ep_ops
from deep_ep_ops import check_rules as R
from deep_ep_ops import validation as V
from deep_ep_ops.codegen import ep_checks, py_checks
from tests.cpu_extension import build_cpu_extension
from tests.ep_check_examples import (EXAMPLES, ON_CUDA_BUFFER, E, HID, K, M, cached_args,
                                     combine_args, dispatch_args, expected)

PY_CHECKS = {"dispatch": V.check_dispatch, "cached_dispatch": V.check_cached_dispatch,
             "combine": V.check_combine}
BASELINES = {"dispatch": dispatch_args, "cached_dispatch": cached_args, "combine": combine_args}
OPS = {c.op: c for c in R.OPS}
RULES = {f"{c.op}.{r.name}": (c, r) for c in R.OPS + R.VALUE_OPS for r in c.rules}


@pytest.fixture(scope="module")
def buf(single_rank_group):
    b = deep_ep_ops.Buffer(single_rank_group, num_max_tokens_per_rank=M, hidden=HID,
                           num_topk=K, num_experts=E)
    yield b
    b.destroy()


@pytest.fixture(scope="module")
def cuda_buf(buf):
    """What the checks read of ``buf``, as if it were an NCCL Buffer on CUDA."""
    return SimpleNamespace(hidden=buf.hidden, num_max_tokens_per_rank=buf.num_max_tokens_per_rank,
                           num_topk=buf.num_topk, num_experts=buf.num_experts,
                           group_name=buf.group_name, device=torch.device("cuda", 0),
                           backend="nccl")


def _where(rule_id: str, buf, cuda_buf) -> tuple:
    """(the Buffer, the device of the unspoilt tensors) that ``rule_id``'s example runs on."""
    return (cuda_buf, "meta") if rule_id in ON_CUDA_BUFFER else (buf, "cpu")


def test_every_rule_has_one_example() -> None:
    assert list(RULES) == R.rule_ids()
    assert set(EXAMPLES) == set(RULES), (set(RULES) ^ set(EXAMPLES))


@pytest.mark.parametrize("rule_id", R.rule_ids())
def test_example_message_is_the_rules(rule_id: str) -> None:
    """The example's message is the one its rule declares: its op, argument and expected text
    (the fields filled in)."""
    checks, rule = RULES[rule_id]
    pattern = "".join(re.escape(lit) + (".+?" if name is not None else "")
                      for lit, name, _, _ in Formatter().parse(rule.expected))
    message = EXAMPLES[rule_id][2]
    assert EXAMPLES[rule_id][0] == checks.op
    assert re.fullmatch(rf"deep_ep\.{checks.op}: {rule.arg.name} must be {pattern}; got .+",
                        message), message


@pytest.mark.parametrize("op", sorted(PY_CHECKS))
def test_baseline_passes(buf, op: str, monkeypatch) -> None:
    """The examples spoil one argument of a call that passes every rule (the value checks
    that follow the rules are off: the examples' handles are zeros)."""
    monkeypatch.setattr(V, "wants_value_checks", lambda t: False)
    PY_CHECKS[op](buf, **BASELINES[op]("cpu"))


@pytest.mark.parametrize("op", sorted(PY_CHECKS))
def test_baseline_passes_on_cuda(cuda_buf, op: str) -> None:
    """The device examples' baseline: unspoilt meta tensors pass every rule of a Buffer on
    CUDA (the device rules skip meta tensors; the value checks skip them too)."""
    PY_CHECKS[op](cuda_buf, **BASELINES[op]("meta"))


@pytest.mark.parametrize("rule_id", R.rule_ids())
def test_python_message(buf, cuda_buf, rule_id: str) -> None:
    op, args, _ = EXAMPLES[rule_id]
    on, dev = _where(rule_id, buf, cuda_buf)
    with pytest.raises(ValueError) as err:
        PY_CHECKS[op](on, **args(dev))
    assert str(err.value) == expected(rule_id, buf.group_name, dev)


@pytest.mark.parametrize("rule_id", R.rule_ids())
def test_op_message(buf, rule_id: str) -> None:
    """The same through the op (CPU backend), as tests/gpu/test_errors_gpu.py calls it."""
    if rule_id in ON_CUDA_BUFFER:
        pytest.skip("needs an NCCL Buffer on a GPU (tests/gpu/test_errors_gpu.py)")
    op, args, _ = EXAMPLES[rule_id]
    with pytest.raises(ValueError) as err:
        getattr(torch.ops.deep_ep, op)(**args("cpu"), group_name=buf.group_name)
    assert str(err.value) == expected(rule_id, buf.group_name, "cpu")


def test_every_rule_renders() -> None:
    text = ep_checks.render()
    for checks in R.OPS:
        body = text.split(f"inline void {checks.op}_shapes(")[1].split("\n}\n")[0]
        assert [ln.strip()[3:] for ln in body.splitlines() if ln.startswith("  // ")] == \
            [r.name for r in checks.rules]
        assert body.count("    fail(op, ") == len(checks.rules)


def test_every_check_renders_in_both_languages() -> None:
    """Each rule, value rule and header check is one branch of its function in the C++ header
    and in the Python source validation.py compiled."""
    cpp = ep_checks.render()
    sources = py_checks._sources()
    for checks in R.OPS + R.VALUE_OPS + R.HANDLE_OPS:
        suffix = {R.OpChecks: "", R.ValueChecks: "_values", R.HandleChecks: "_handle"}
        name = checks.op + suffix[type(checks)]
        items = checks.checks if isinstance(checks, R.HandleChecks) else checks.rules
        py = sources[name]
        assert V._RULES[name].__code__.co_filename == f"<deep_ep_ops checks {name}>"
        assert re.findall(r"# (\w+)$", py, re.M) == [r.name for r in items], name
        cpp_name = checks.op + "_shapes" if isinstance(checks, R.OpChecks) else name
        body = cpp.split(f"inline void {cpp_name}(")[1].split("\n}\n")[0]
        assert re.findall(r"^  (?:\{  )?// (\w+)$", body, re.M) == [r.name for r in items], name


# -- the rendered C++ checks, built without CUDA ------------------------------------------

@pytest.fixture(scope="module")
def cpp() -> ModuleType:
    if shutil.which("c++") is None or not is_ninja_available():
        pytest.skip("needs a C++ compiler and ninja")
    return build_cpu_extension("deep_ep_ops_ep_checks_cpu", [], "ep_checks_cpu_module.cpp")


def _cpp_call(cpp: ModuleType, buf, op: str, args: dict) -> None:
    facts = [f.of(buf) for f in R.FACTS]
    getattr(cpp, op)(facts, buf.group_name, *(args[a.name] for a in OPS[op].args))


@pytest.mark.parametrize("op", sorted(PY_CHECKS))
def test_cpp_baseline_passes(cpp, buf, cuda_buf, op: str) -> None:
    _cpp_call(cpp, buf, op, BASELINES[op]("cpu"))
    _cpp_call(cpp, cuda_buf, op, BASELINES[op]("meta"))


@pytest.mark.parametrize("rule_id", R.rule_ids())
def test_cpp_message(cpp, buf, cuda_buf, rule_id: str) -> None:
    op, args, _ = EXAMPLES[rule_id]
    on, dev = _where(rule_id, buf, cuda_buf)
    with pytest.raises(ValueError) as err:
        _cpp_call(cpp, on, op, args(dev))
    assert str(err.value) == expected(rule_id, buf.group_name, dev)
