"""The closed-form gradient checks of tests/test_autograd_closed_forms.py on CUDA, where the
C++ AutogradCUDA kernels (csrc/torch/ep_autograd.cpp) compute them; 1 and 2 GPUs."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.dist_gpu import gpus, rank_device, run_on_gpus
from tests.test_autograd_closed_forms import closed_form_body

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")


def _body(rank: int, world: int, gloo) -> None:
    import torch.distributed as dist
    closed_form_body(rank, world, rank_device())
    for op in ("_dispatch_static", "cached_dispatch", "combine"):
        dump = torch._C._dispatch_dump(f"deep_ep::{op}")
        assert any(line.startswith("AutogradCUDA:") and "ep_autograd.cpp" in line
                   for line in dump.splitlines()), dump
    dist.barrier(group=gloo)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cpp_autograd_closed_forms(world: int) -> None:
    run_on_gpus(_body, world)
