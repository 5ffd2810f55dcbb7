"""The C++ autograd kernels (csrc/torch/ep_autograd.cpp; AutogradCUDA in production)
built here without CUDA and registered on AutogradCPU in each rank process, then checked over
gloo by the bodies that check the Python formulas: closed-form gradients, float64 gradcheck,
torch.compile (aot_eager) forward + backward, and torch.export.

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


def _body(rank: int, world: int) -> None:
    from tests import test_compile, test_gradcheck
    from tests.test_autograd_closed_forms import closed_form_body

    _load().register_autograd_kernels("AutogradCPU")
    for op in ("_dispatch_static", "cached_dispatch", "combine"):
        dump = torch._C._dispatch_dump(f"deep_ep::{op}")
        assert any(line.startswith("AutogradCPU:") and "ep_autograd.cpp" in line
                   for line in dump.splitlines()), dump
    closed_form_body(rank, world, torch.device("cpu"))
    test_gradcheck._body(rank, world)
    test_compile._compile_body(rank, world, "aot_eager")
    test_compile._export_body(rank, world)


@pytest.fixture(scope="module")
def built() -> None:
    _load()  # build once here; the rank processes load the cached module


@pytest.mark.parametrize("world", [1, 2])
def test_cpp_autograd_on_cpu(built, world: int) -> None:
    run_ranks(_body, world)
