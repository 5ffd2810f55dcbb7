"""Run a function on R local ranks, one process each: on CPU (gloo), one GPU per rank (NCCL), or
several ranks per GPU under CUDA MPS (NCCL for reference collectives, CUDA IPC for the library's
peer memory). The demo, the examples, the tests and the benchmarks all start ranks through
``spawn``.

Several ranks per GPU (``ranks_per_gpu > 1``):

* an MPS control daemon must serve the GPU: ``spawn`` starts one with a private pipe folder when
  none answers (and stops it at the end), and refuses with a clear message when the MPS binaries
  are missing. Without MPS, processes on one GPU time-slice and a rank's kernel that waits for a
  peer's kernel would spin through whole time slices;
* each rank gets ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 // ranks_per_gpu`` (so kernel grids,
  which follow the SMs a process sees, split the GPU) and its own ``NCCL_HOSTID`` (NCCL refuses
  two ranks of one host on one GPU; apart, its network transport links them).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MPS_CONTROL = "nvidia-cuda-mps-control"


def init_single_rank_group(backend: str = "gloo",
                           device_id: Optional[torch.device] = None) -> None:
    """The default process group with this process as its only rank. Its store lives in this
    process (no TCP port to pick, so no race with other processes for one)."""
    extra = {} if device_id is None else {"device_id": device_id}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Placement:
    """Where the ranks of one ``spawn`` run: backend, GPU of each rank, ranks per GPU."""
    backend: str
    world_size: int
    ranks_per_gpu: int = 1
    devices: tuple[int, ...] = ()
    env: dict = field(default_factory=dict)  # extra environment of every rank

    def rank_env(self, rank: int) -> dict[str, str]:
        env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1", **self.env}
        if self.ranks_per_gpu > 1:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // self.ranks_per_gpu)
            env["NCCL_HOSTID"] = f"{socket.gethostname()}-deep-ep-ops-rank{rank}"
        return env

    def describe(self) -> str:
        if self.backend == "gloo":
            return f"{self.world_size} ranks on CPU (gloo)"
        gpus = len(set(self.devices))
        share = (f", {self.ranks_per_gpu} per GPU under MPS at "
                 f"{100 // self.ranks_per_gpu} % of the SMs each" if self.ranks_per_gpu > 1 else "")
        return f"{self.world_size} ranks on {gpus} GPU{'s' if gpus > 1 else ''} (nccl{share})"


def place(world_size: int, backend: str = "gloo", ranks_per_gpu: Optional[int] = None,
          env: Optional[dict] = None) -> Placement:
    """Where ``world_size`` ranks go. NCCL: one GPU per rank when there are enough GPUs, else
    (or when ``ranks_per_gpu`` says so) ``ranks_per_gpu`` consecutive ranks per GPU."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "gloo":
        return Placement("gloo", world_size, env=dict(env or {}))
    gpus = gpu_count()
    if gpus == 0:
        raise RuntimeError("backend 'nccl' needs CUDA GPUs and this machine has none "
                           "(use backend 'gloo' for CPU ranks)")
    per_gpu = ranks_per_gpu if ranks_per_gpu is not None else math.ceil(world_size / gpus)
    if per_gpu < 1:
        raise ValueError(f"ranks_per_gpu must be >= 1, got {per_gpu}")
    if math.ceil(world_size / per_gpu) > gpus:
        raise ValueError(f"{world_size} ranks at {per_gpu} per GPU need "
                         f"{math.ceil(world_size / per_gpu)} GPUs; this machine has {gpus}")
    devices = tuple(r // per_gpu for r in range(world_size))
    return Placement("nccl", world_size, per_gpu, devices, dict(env or {}))


# ---------------------------------------------------------------------------------------------
# MPS

def _mps_answers(pipe_dir: str) -> bool:
    """Whether an MPS control daemon listens on ``pipe_dir``."""
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return False
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir)
    try:
        run = subprocess.run([MPS_CONTROL], input="get_default_active_thread_percentage\n",
                             capture_output=True, text=True, env=env, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict[str, str]]:
    """An MPS control daemon for this process's children: the one that answers on
    ``CUDA_MPS_PIPE_DIRECTORY`` (default /tmp/nvidia-mps) if any, else one started here with
    private pipe and log folders and stopped on exit. Yields the environment that points a
    child at it."""
    if shutil.which(MPS_CONTROL) is None:
        raise RuntimeError(
            "several ranks per GPU need CUDA MPS, and nvidia-cuda-mps-control is not on PATH. "
            "Without MPS, processes sharing a GPU time-slice and a kernel waiting for a peer's "
            "kernel would spin; run one rank per GPU instead, or install the MPS binaries")
    existing = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    if _mps_answers(existing):
        yield {"CUDA_MPS_PIPE_DIRECTORY": existing}
        return
    root = tempfile.mkdtemp(prefix="deep_ep_ops_mps_")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log")}
    for d in env.values():
        os.makedirs(d)
    full = dict(os.environ, **env)
    start = subprocess.run([MPS_CONTROL, "-d"], env=full, capture_output=True, text=True,
                           timeout=30)
    if start.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"starting the MPS daemon failed ({start.returncode}): "
                           f"{start.stderr.strip() or start.stdout.strip()}")
    deadline = time.monotonic() + 15
    while not _mps_answers(env["CUDA_MPS_PIPE_DIRECTORY"]):
        if time.monotonic() > deadline:
            log = _read(os.path.join(env["CUDA_MPS_LOG_DIRECTORY"], "control.log"))
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"the MPS daemon did not answer within 15 s; its log: {log}")
        time.sleep(0.1)
    try:
        yield env
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([MPS_CONTROL], input="quit\n", env=full, capture_output=True,
                           text=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()[-2000:]
    except OSError:
        return "(none)"


# ---------------------------------------------------------------------------------------------
# processes

class _PrefixedLines:
    """A text stream that starts every line with a prefix (one rank's prints stay apart)."""

    def __init__(self, stream, prefix: str) -> None:
        self._stream, self._prefix, self._at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _worker(rank: int, placement: Placement, port: int, store_timeout: timedelta, reports,
            fn: Callable, args: tuple, threads: int, prefix_output: bool) -> None:
    os.environ.update(placement.rank_env(rank))  # before CUDA initialises in this process
    if prefix_output:
        sys.stdout = _PrefixedLines(sys.stdout, f"[rank {rank}] ")
        sys.stderr = _PrefixedLines(sys.stderr, f"[rank {rank}] ")
    import faulthandler
    faulthandler.enable()  # a crashing rank prints its Python stack
    # a hanging rank prints every thread's stack periodically, so a run killed from outside
    # still shows where each rank waited
    faulthandler.dump_traceback_later(float(os.environ.get("DEEP_EP_OPS_STACK_DUMP_S", "120")),
                                      repeat=True)
    torch.set_num_threads(threads)
    try:
        # a client of the store the parent listens on (see _run)
        store = dist.TCPStore("127.0.0.1", port, placement.world_size, is_master=False,
                              timeout=store_timeout)
        init = dict(store=store, rank=rank, world_size=placement.world_size)
        if placement.backend == "nccl":
            device = torch.device("cuda", placement.devices[rank])
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **init)
        else:
            dist.init_process_group("gloo", **init)
        result = fn(rank, placement.world_size, *args)
        dist.barrier()  # every rank's collectives are done here...
        _leave_together(store, placement.world_size)  # ...and no rank exits before all are
        reports.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        reports.put((rank, False, traceback.format_exc()))
        _flush_and_exit(1)
    # Skip interpreter and process-group teardown: NCCL's and gloo's destructors can stall or
    # abort ("terminate called without an active exception") and turn a passed rank into a
    # failure; the process ends here either way.
    _flush_and_exit(0)


def _leave_together(store, world_size: int) -> None:
    """Wait on the rendezvous store until every rank got here. A rank that left right after
    its process group's barrier returned could still owe a peer the barrier's last bytes (the
    NCCL network transport sends them from a proxy thread, which os._exit kills): the peer then
    died in that barrier with 'Connection closed by remote peer' (seen at R = 8 on one GPU)."""
    if store.add("deep_ep_ops/ranks_leaving", 1) == world_size:
        store.set("deep_ep_ops/all_leaving", "1")
    store.wait(["deep_ep_ops/all_leaving"])


def _flush_and_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class RanksFailed(AssertionError):
    """One or more ranks raised, crashed or ran past the deadline; ``str()`` has every rank's
    traceback."""


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
          ranks_per_gpu: Optional[int] = None, timeout_s: float = 600.0, threads: int = 1,
          prefix_output: bool = False, env: Optional[dict] = None,
          what: str = "local ranks") -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` new processes with the default
    process group initialised (``backend`` gloo, or nccl with the rank's GPU as ``device_id``)
    and return each rank's result (picklable), by rank.

    Fail fast: once a rank fails the others are killed (they would wait in a collective
    forever) and ``RanksFailed`` carries every rank's traceback. ``fn`` must be importable
    (a module-level function): ranks are spawned, not forked.
    """
    placement = place(world_size, backend, ranks_per_gpu, env)
    mps = mps_daemon() if placement.ranks_per_gpu > 1 else contextlib.nullcontext({})
    with mps as mps_env:
        placement = Placement(placement.backend, world_size, placement.ranks_per_gpu,
                              placement.devices, {**placement.env, **mps_env})
        return _run(placement, fn, args, timeout_s, threads, prefix_output, what)


def _run(placement: Placement, fn: Callable, args: tuple, timeout_s: float, threads: int,
         prefix_output: bool, what: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    reports = ctx.SimpleQueue()
    # The parent listens for the ranks' rendezvous on a port the kernel picks while binding it:
    # picking a "free" port first and binding it later in a rank raced with other processes
    # (EADDRINUSE seen on the device). It lives until every rank is gone. No wait on it needs
    # to outlast the run's own deadline, after which every rank is killed.
    store_timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, placement.world_size, is_master=True,
                          wait_for_workers=False, timeout=store_timeout)
    procs = [ctx.Process(target=_worker, args=(r, placement, store.port, store_timeout, reports,
                                              fn, args, threads, prefix_output))
             for r in range(placement.world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []

    def drain() -> None:  # read as we go: a rank blocks on a full pipe until its report is read
        while not reports.empty():
            rank, ok, payload = reports.get()
            if ok:
                results[rank] = payload
            else:
                failures.append((rank, payload))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            drain()
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2)  # let the failing rank's peers report their own errors first
                break
            time.sleep(0.05)
    finally:  # also when the caller is interrupted: no rank outlives the call
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
    drain()
    if failures or alive or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures))
        timed_out = time.monotonic() >= deadline
        raise RanksFailed(f"{what} failed: {placement.describe()}, exit codes "
                          f"{[p.exitcode for p in procs]}, killed {len(alive)}, timed out "
                          f"{timed_out} (after {timeout_s:.0f} s)\n{details}")
    return [results.get(r) for r in range(placement.world_size)]
