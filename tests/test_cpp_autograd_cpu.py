"""The C++ autograd kernels (csrc/torch/ep_autograd.cpp with the rendered
generated/ep_autograd_formulas.hpp; AutogradCUDA in production) built here without CUDA and
registered on AutogradCPU in each rank process, then checked over gloo by the bodies that check
the Python formulas: closed-form gradients, float64 gradcheck, torch.compile (aot_eager) forward
+ backward, and torch.export; and against the Python evaluation of the same table
(deep_ep_ops/autograd_formulas.py): equal gradients, bit for bit, case by case.

Needs a C++ compiler and ninja (the test extra installs ninja). The first run builds the
module (about a minute on 2 cores); later runs reuse torch's extension cache.
"""
from __future__ import annotations

import shutil
from types import ModuleType

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from tests.cpu_extension import build_cpu_extension
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(),
    reason="needs a C++ compiler and ninja to build csrc/torch/ep_autograd.cpp")


def _load() -> ModuleType:
    return build_cpu_extension("deep_ep_ops_autograd_cpu", ["torch/ep_autograd.cpp"],
                               "autograd_cpu_module.cpp")


def _register_cpp() -> None:
    """The C++ kernels of every formula on AutogradCPU, in this rank process."""
    from deep_ep_ops.autograd_formulas import FORMULAS

    _load().register_autograd_kernels("AutogradCPU")
    for f in FORMULAS:
        dump = torch._C._dispatch_dump(f"deep_ep::{f.op}")
        assert any(line.startswith("AutogradCPU:") and "ep_autograd.cpp" in line
                   for line in dump.splitlines()), dump


def _body(rank: int, world: int) -> None:
    from tests import test_compile, test_gradcheck
    from tests.test_autograd_closed_forms import closed_form_body

    _register_cpp()
    closed_form_body(rank, world, torch.device("cpu"))
    test_gradcheck._body(rank, world)
    test_compile._compile_body(rank, world, "aot_eager")
    test_compile._export_body(rank, world)


def _gradient_cases(group_name: str, E: int, rank: int) -> list[tuple[str, tuple]]:
    """The gradients of every formula's branches (which inputs want one, expand or not, fp8 x
    with scales, fp32 / fp64, weights given or not) for seeded inputs and output gradients."""
    ops = torch.ops.deep_ep
    g = torch.Generator().manual_seed(100 + rank)
    T, H = 6, 16
    x = torch.randn(T, H, generator=g)
    idx = torch.rand(T, E, generator=g).topk(2, dim=1).indices
    idx[1, 1] = -1
    w = torch.rand(T, 2, generator=g)
    cases = []

    def grads(name: str, outputs, inputs) -> None:
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        outs = [o for o in outputs if o.requires_grad]
        seeds = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        cases.append((name, torch.autograd.grad(outs, wanted, seeds, allow_unused=True)))

    for expand in (True, False):
        for wants in ("xw", "w", "x"):
            xi, wi = x.clone().requires_grad_("x" in wants), w.clone().requires_grad_("w" in wants)
            out = ops._dispatch_static(xi, None, idx, wi, group_name, E, 1, expand, 0)
            grads(f"_dispatch_static expand={expand} wants={wants}", (out[0], out[3]), (xi, wi))
    # fp8 x with scales: the scales take edge 1, so topk_weights moves to edge 3
    s = torch.rand(T, 1, generator=g, requires_grad=True)
    wi = w.clone().requires_grad_()
    out = ops._dispatch_static(x.to(torch.float8_e4m3fn), s, idx, wi, group_name, E, 1, True, 0)
    grads("_dispatch_static fp8", (out[1], out[3]), (s, wi))
    handle = out[5]
    xi = x.clone().requires_grad_()
    grads("cached_dispatch", ops.cached_dispatch(xi, None, handle, group_name, 0), (xi,))
    C = handle.shape[0] - 1 - T
    for dtype in (torch.float32, torch.float64):
        for wants in ("xw", "w", "x", "x-"):
            rows = torch.randn(C, H, generator=g, dtype=dtype).requires_grad_("x" in wants)
            weights = None if wants == "x-" else \
                torch.rand(C, generator=g, dtype=dtype).requires_grad_("w" in wants)
            grads(f"combine {dtype} wants={wants}",
                  (ops.combine(rows, handle, weights, group_name, 0),), (rows, weights))
    return cases


def _same_as_python_body(rank: int, world: int) -> None:
    """Python's evaluation of the table first, then the rendered C++ on the same calls."""
    import torch.distributed as dist

    import deep_ep_ops
    E = 4 * world
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=8, hidden=16, num_topk=2,
                             num_experts=E)
    python = _gradient_cases(buf.group_name, E, rank)
    _register_cpp()
    cpp = _gradient_cases(buf.group_name, E, rank)
    assert [name for name, _ in cpp] == [name for name, _ in python]
    for (name, want), (_, got) in zip(python, cpp):
        assert len(got) == len(want) and want[-1] is not None, name
        for a, b in zip(want, got):  # the scales of fp8 x get none (not differentiable)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), \
                f"rank {rank}: {name}"
    buf.destroy()


@pytest.fixture(scope="module")
def built() -> None:
    _load()  # build once here; the rank processes load the cached module


@pytest.mark.parametrize("world", [1, 2])
def test_cpp_autograd_on_cpu(built, world: int) -> None:
    run_ranks(_body, world)


@pytest.mark.parametrize("world", [1, 2])
def test_cpp_formulas_equal_python(built, world: int) -> None:
    run_ranks(_same_as_python_body, world)
