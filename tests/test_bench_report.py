"""The benchmark's report arithmetic (CPU): kernel grids read from a profiler trace, and the
ratio table against the limits of the same run."""
from __future__ import annotations

import pytest

from bench.bench_ep import _markdown
from bench.timing import ctas_from_trace


def test_ctas_from_trace_reads_kernel_grids_only() -> None:
    trace = {"traceEvents": [
        {"cat": "kernel", "name": "local_dispatch_kernel", "args": {"grid": [132, 1, 1]}},
        {"cat": "kernel", "name": "tiled", "args": {"grid": [4, 2, 3]}},
        {"cat": "kernel", "name": "as_text", "args": {"grid": "[8, 1, 1]"}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "args": {"grid": [9, 9, 9]}},
        {"cat": "kernel", "name": "no_grid", "args": {}},
        {"cat": "gpu_memset", "name": "Memset"},
    ]}
    assert ctas_from_trace(trace) == [("local_dispatch_kernel", 132), ("tiled", 24),
                                      ("as_text", 8)]
    assert ctas_from_trace({}) == []


def _workload(name: str, d_us: float, c_us: float, logical: float, nvlink: float) -> dict:
    return {"name": name, "dispatch_us": d_us, "combine_us": c_us,
            "dispatch_logical_GBps": logical, "dispatch_nvlink_GBps": nvlink,
            "combine_logical_GBps": logical / 2, "combine_nvlink_GBps": nvlink / 2,
            "dispatch_sms": 24, "combine_sms": 16, "nccl_dispatch_us": 2 * d_us,
            "nccl_combine_us": 6 * c_us, "dispatch_host_us": 12.0, "combine_host_us": 9.0}


def _ratio_row(md: str, name: str) -> list[str]:
    ratios = md.split("Ratios:")[1]
    row = next(line for line in ratios.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


@pytest.mark.parametrize("ranks", [1, 2])
def test_markdown_ratios_use_the_limit_of_the_rank_count(ranks: int) -> None:
    limits = {"d2d_copy_GBps": 2000.0, "peer_both_ways_GBps": 400.0}
    report = {"kind": "test-kind", "date": "2026-11-23", "ranks": ranks, "limits": limits,
              "ranks_per_gpu": 1, "sms_per_rank": 132, "timing": "CUDA events",
              "workloads": [_workload("prefill", 50.0, 80.0, 900.0, 200.0)],
              "sm_sweep": [], "token_sweep": [], "peers": {}}
    md = _markdown(report)
    # one rank: logical rate over the d2d copy counted once (1000); several: NVLink rate over
    # the both-ways peer copy (400)
    expect = ["0.90", "0.45"] if ranks == 1 else ["0.50", "0.25"]
    assert _ratio_row(md, "prefill") == expect + ["2.00", "6.00"]
    assert ("over the d2d copy (1000 GB/s)" in md) == (ranks == 1)
    assert ("over the both-ways peer copy (400 GB/s)" in md) == (ranks == 2)
    assert "| 24 / 16 |" in md


def test_markdown_says_when_the_sm_count_is_unknown() -> None:
    w = _workload("decode", 10.0, 8.0, 90.0, 0.0)
    w["dispatch_sms"] = None  # the profiler saw no kernel
    del w["combine_sms"]  # a report written before the column existed
    report = {"kind": "k", "date": "d", "ranks": 1, "limits": {"d2d_copy_GBps": 2000.0},
              "ranks_per_gpu": 1, "sms_per_rank": 132, "timing": "CUDA events",
              "workloads": [w], "sm_sweep": [], "token_sweep": [], "peers": {}}
    assert "| n/a / n/a |" in _markdown(report)
