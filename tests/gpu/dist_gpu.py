"""Run a test body on R GPU ranks: one process per rank with an NCCL default group (created with
device_id, so the communicator exists at once) and a gloo group over the same ranks for the CPU
reference. Ranks go one per GPU when there are enough GPUs, else several per GPU under MPS
(``pytest --ranks-per-gpu N`` forces N); deep_ep_ops.local_ranks does the process handling."""
from __future__ import annotations

import math
import os
import shutil
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from deep_ep_ops.local_ranks import MPS_CONTROL, gpu_count, spawn

# Never use NVLink multicast on the shared test machines.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

RANKS_PER_GPU_ENV = "DEEP_EP_OPS_TEST_RANKS_PER_GPU"  # set by conftest's --ranks-per-gpu


def gpus() -> int:
    return gpu_count()


def rank_device() -> torch.device:
    """This rank's GPU (inside a body run by run_gpus)."""
    return torch.device("cuda", torch.cuda.current_device())


def _with_gloo(rank: int, world: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(4)
    gloo = dist.new_group(list(range(world)), backend="gloo")
    fn(rank, world, gloo, *args)
    dist.barrier(group=gloo)


def ranks_per_gpu(world: int) -> int:
    """Ranks per GPU for a world of ``world`` ranks: --ranks-per-gpu if given, else the fewest
    that fit on this machine's GPUs."""
    forced = os.environ.get(RANKS_PER_GPU_ENV)
    if forced:
        return min(int(forced), world)
    return max(1, math.ceil(world / max(gpus(), 1)))


def run_gpus(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 500,
             per_gpu: Optional[int] = None) -> None:
    """Call ``fn(rank, world, gloo_group, *args)`` on ``world`` GPU ranks."""
    spawn(_with_gloo, world, fn, args, backend="nccl",
          ranks_per_gpu=per_gpu or ranks_per_gpu(world), timeout_s=timeout_s,
          what="GPU test")


def run_on_gpus(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 500) -> None:
    """``run_gpus`` for a test: skips it when this machine can place ``world`` ranks neither one
    per GPU nor several per GPU under MPS."""
    import pytest
    per_gpu = ranks_per_gpu(world)
    if gpus() == 0:
        pytest.skip("needs a CUDA GPU")
    if math.ceil(world / per_gpu) > gpus():
        pytest.skip(f"{world} ranks at {per_gpu} per GPU need more than {gpus()} GPUs")
    if per_gpu > 1 and shutil.which(MPS_CONTROL) is None:
        pytest.skip(f"{world} ranks on {gpus()} GPU(s) need CUDA MPS ({MPS_CONTROL} not found)")
    run_gpus(fn, world, *args, timeout_s=timeout_s, per_gpu=per_gpu)


def capture_graph(fn: Callable[[], Any], warmup: int = 1,
                  before_capture: Callable[[], None] | None = None):
    """``(graph, output)``: ``fn`` run ``warmup`` times on a side stream (allocator and lazy
    initialisation stay out of the graph), then captured once in a CUDA graph.
    ``before_capture`` runs between the two (e.g. a cross-rank barrier)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
