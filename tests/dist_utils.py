"""Run a test body on R local ranks (one process each) and surface their failures.

Fail fast: as soon as one rank exits with an error the others are killed (they would wait in a
collective forever) and every rank's traceback is raised in the test process.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deep_ep_ops.localhost import free_port


def exit_rank(errors, rank: int, body: Callable[[], None]) -> None:
    """Run ``body`` in a rank process; report a failure to the parent; never return."""
    try:
        body()
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.put((rank, traceback.format_exc()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # Skip interpreter teardown: static destructors of torch's worker threads can abort
    # ("terminate called without an active exception") and turn a passed rank into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(target: Callable, world_size: int, args: tuple, timeout_s: float,
                what: str = "distributed test") -> None:
    """Start ``target(rank, world_size, port, errors, *args)`` per rank and wait for all."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world_size, port, errors, *args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2)  # let the failing rank's peers report their own errors first
            break
        time.sleep(0.05)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    if reports or alive or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(reports))
        timed_out = time.monotonic() >= deadline
        raise AssertionError(f"{what} failed (exit codes {[p.exitcode for p in procs]}, "
                             f"killed: {len(alive)}, timed out: {timed_out})\n{details}")


def _gloo_worker(rank: int, world_size: int, port: int, errors, fn: Callable,
                 args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)

    def body():
        fn(rank, world_size, *args)
        # leave together: gloo aborts a rank whose peer closes its sockets mid-teardown
        dist.barrier()
        dist.destroy_process_group()
    exit_rank(errors, rank, body)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank of a gloo group (CPU)."""
    spawn_ranks(_gloo_worker, world_size, (fn, args), timeout_s)
