"""Run a test body on R local GPUs: one process per GPU with an NCCL default group (created with
device_id, so the communicator exists at once) and a gloo group over the same ranks for the
CPU reference."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Never use NVLink multicast on the shared test machines.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, errors) -> None:
    import faulthandler
    faulthandler.enable()  # a crashing rank prints its Python stack
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    torch.set_num_threads(4)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    gloo = dist.new_group(list(range(world)), backend="gloo")
    try:
        fn(rank, world, gloo, *args)
        dist.barrier(group=gloo)
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip teardown: destructors of torch's NCCL/gloo threads can abort a passed rank.
    os._exit(0)


def run_gpus(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 500) -> None:
    """Call ``fn(rank, world, gloo_group, *args)`` on ``world`` GPU processes."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    if reports or alive or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(reports))
        raise AssertionError(f"GPU test failed (exit codes {[p.exitcode for p in procs]}, "
                             f"timed out: {len(alive)})\n{details}")


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
