"""The checks every CUDA inter-host stage shares (csrc/interhost/rail_stage.cpp), built on the
host without a GPU: a rank's place on the rails and the words of its errors, which name the
op, the rank with its host and local index, and the peer host with its rail rank. The NCCL
implementation runs in tests/gpu/test_interhost_gpu.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _nccl_include() -> Path | None:
    try:
        from deep_ep_ops.cuda.loader import nccl_home
        return nccl_home() / "include"
    except RuntimeError:
        return None


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> dict[str, str]:
    nccl = _nccl_include()
    if shutil.which("c++") is None or not (CUDA_HOME / "include" / "cuda_runtime.h").is_file() \
            or nccl is None:
        pytest.skip("needs a C++ compiler, the CUDA toolkit's headers and cudart, and nccl.h")
    exe = tmp_path_factory.mktemp("rail") / "rail_stage_checks"
    src = ROOT / "csrc"
    cmd = ["c++", "-std=c++20", "-O1", "-Wall", "-pthread", f"-I{src}",
           f"-I{CUDA_HOME / 'include'}", f"-I{nccl}",
           str(ROOT / "tests" / "cpp" / "rail_stage_checks.cpp"),
           str(src / "interhost" / "rail_stage.cpp"), f"-L{CUDA_HOME / 'lib64'}", "-lcudart",
           f"-Wl,-rpath,{CUDA_HOME / 'lib64'}", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_place_and_where(lines) -> None:
    assert lines["place"] == "ok"
    assert lines["where"] == "rank 5 (host 2, local index 1) / host 0 (rail peer rank 1)"
    assert "rank 6 is not in a group of 3 hosts of 2 ranks" in lines["place_out_of_range"]


def test_piece_checks_name_op_rank_and_peer(lines) -> None:
    assert lines["good"] == "ok"
    where = "rank 5 (host 2, local index 1)"
    assert lines["own_host"] == (f"deep_ep.dispatch: {where}: a piece for host 2; pieces go to "
                                 "the other hosts 0..2 only")
    assert lines["bad_host"].startswith(f"deep_ep.dispatch: {where}: a piece for host 3")
    assert lines["negative"] == (f"deep_ep.combine: {where}: negative byte count for host 1 "
                                 "(rail peer rank 3)")
    assert lines["null"] == f"deep_ep.dispatch: {where}: null buffer for host 0 (rail peer rank 1)"
    assert lines["destroyed"] == f"deep_ep.dispatch: the inter-host stage of {where} was destroyed"


def test_abort_waits_out_a_call_then_every_later_call_raises_its_reason(lines) -> None:
    """The stall watch's abort never runs under a call another thread is making; once done,
    the transport is aborted once and every call raises the stall it was aborted for."""
    assert lines["abort_inside_a_call"] == "0"
    assert lines["abort"] == "1" and lines["abort_again"] == "1"
    assert lines["transport_aborts"] == "1 alive: 0"
    assert lines["aborted"] == (
        "deep_ep.combine: the inter-host stage of rank 1 (host 1, local index 0) was aborted "
        "after a stall (deep_ep.dispatch: rank 1 (host 1, local index 0) waits for host 0); "
        "destroy this Buffer and the process group")
