"""Run a test body on R local GPUs: one process per GPU with an NCCL default group (created with
device_id, so the communicator exists at once) and a gloo group over the same ranks for the
CPU reference. Process handling (fail fast, tracebacks) is tests/dist_utils.py's."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from tests.dist_utils import exit_rank, spawn_ranks

# Never use NVLink multicast on the shared test machines.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _worker(rank: int, world: int, port: int, errors, fn: Callable, args: tuple) -> None:
    import faulthandler
    faulthandler.enable()  # a crashing rank prints its Python stack
    # a hanging rank prints every thread's stack periodically (stderr), so a run killed from
    # outside still shows where each rank waited
    faulthandler.dump_traceback_later(float(os.environ.get("DEEP_EP_OPS_STACK_DUMP_S", "120")),
                                      repeat=True)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    torch.set_num_threads(4)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    gloo = dist.new_group(list(range(world)), backend="gloo")

    def body():
        fn(rank, world, gloo, *args)
        dist.barrier(group=gloo)
    # Teardown is skipped (exit_rank): destructors of NCCL/gloo threads can abort a passed rank.
    exit_rank(errors, rank, body)


def run_gpus(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 500) -> None:
    """Call ``fn(rank, world, gloo_group, *args)`` on ``world`` GPU processes."""
    spawn_ranks(_worker, world, (fn, args), timeout_s, what="GPU test")


def run_on_gpus(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 500) -> None:
    """``run_gpus`` for a test: skips it when this machine has fewer than ``world`` GPUs."""
    import pytest
    if gpus() < world:
        pytest.skip(f"needs {world} GPUs")
    run_gpus(fn, world, *args, timeout_s=timeout_s)


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


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
