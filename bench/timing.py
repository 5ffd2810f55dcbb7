"""Timing helpers for the benchmarks: CUDA-event medians, CUDA-graph replay time, and host
overhead (CPU time from call to return, device work excluded)."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)
    torch.cuda.synchronize()


def hold_gpu(us: float = 300.0) -> None:
    """Queue a spin kernel of about ``us`` microseconds on the current stream.

    Work enqueued behind it then starts back to back on the GPU, so CUDA events around it time
    the device work. Without it the GPU is idle when the start event is recorded and waits for
    every launch: the "device time" of a call becomes its host launch time (at one rank and for
    small batches that was all of it)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    khz = getattr(props, "clock_rate", 0) or 2_000_000
    torch.cuda._sleep(int(us * khz / 1e3))


def event_median_us(fn: Callable[[], object], iters: int = 30, warmup: int = 5,
                    group=None, calls_per_sample: int = 1,
                    device_sync: Callable[[], object] | None = None) -> float:
    """Median over ``iters`` samples of the device time of one call (CUDA events on the current
    stream, the calls enqueued behind hold_gpu), all ranks starting together. A sample of
    ``calls_per_sample`` back-to-back calls divides out the ranks' start skew (they leave the
    host barrier at different times; a collective's first call absorbs the difference).
    ``device_sync`` (a collective kernel, untimed) lines the ranks up on the GPU right before
    the start event, for work with no cross-rank wait of its own (a copy by every rank)."""
    for _ in range(warmup):
        fn()
    _barrier(group)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hold_gpu()
        if device_sync is not None:
            device_sync()
        start.record()
        for _ in range(calls_per_sample):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_sample)
        _barrier(group)
    return statistics.median(times)


def host_overhead_us(fn: Callable[[], object], iters: int = 50, group=None) -> float:
    """Median CPU time from call to return (no synchronisation inside the window)."""
    fn()
    _barrier(group)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        _barrier(group)
    return statistics.median(times)


def graph_replay_us(fn: Callable[[], object], ops_per_call: int = 1, iters: int = 30,
                    replays_per_iter: int = 10, group=None,
                    device_sync: Callable[[], object] | None = None) -> float:
    """Capture ``fn`` once in a CUDA graph; median replay time divided by ``ops_per_call``
    (``device_sync``: as in event_median_us, before each sample's replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    _barrier(group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    _barrier(group)

    def replay():
        for _ in range(replays_per_iter):
            graph.replay()
    per_iter = event_median_us(replay, iters=iters, warmup=2, group=group,
                               device_sync=device_sync)
    return per_iter / replays_per_iter / ops_per_call


def ctas_from_trace(trace: dict) -> list[tuple[str, int]]:
    """(kernel name, CTAs) of every GPU kernel in a torch.profiler chrome trace."""
    out = []
    for ev in trace.get("traceEvents", []):
        grid = ev.get("args", {}).get("grid") if ev.get("cat") == "kernel" else None
        if isinstance(grid, str):  # some writers give "[x, y, z]" as a string
            grid = re.findall(r"\d+", grid)
        if grid:
            out.append((ev.get("name", "?"), math.prod(int(g) for g in grid)))
    return out


def sms_used(fn: Callable[[], object]) -> int | None:
    """SMs one call of ``fn`` occupies at most: the largest grid among the kernels it launches
    (from the profiler's trace), capped by the device's SM count; None (with a line on stderr
    if the profiler failed) when the trace holds no kernel, so a benchmark's timings survive."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    failed_call = False
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            try:
                fn()
                torch.cuda.synchronize()
            except Exception:
                failed_call = True
                raise
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                kernels = ctas_from_trace(json.load(f))
        finally:
            os.unlink(path)
    except Exception as e:
        if failed_call:
            raise
        # the profiler, not the op, failed: the count is missing, the timings stand
        print(f"bench: SMs used unknown, the profiler failed: {e!r}", file=sys.stderr)
        return None
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return min(sms, max(c for _, c in kernels)) if kernels else None
