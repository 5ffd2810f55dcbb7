"""Run a test body on R local gloo ranks (one process each) and surface their failures."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            errors) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # leave together: gloo aborts a rank whose peer closes its sockets mid-teardown
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        # a failed rank must not leave its peers waiting in a collective forever
        os._exit(1)
    dist.destroy_process_group()
    # Skip interpreter teardown: static destructors of torch's worker threads can abort
    # ("terminate called without an active exception") and turn a passed rank into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; raise with every rank's traceback
    if any rank fails or the run exceeds ``timeout_s``."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]
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
        raise AssertionError(f"distributed test failed (exit codes "
                             f"{[p.exitcode for p in procs]}, timed out: {len(alive)})\n{details}")
