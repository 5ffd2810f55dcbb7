"""The Python glue of the CUDA inter-host stage (deep_ep_ops/cuda/interhost.py) without a GPU:
a stand-in extension records what the glue asks of the C++ stage, on a gloo group.

* each rail's NCCL id comes from its rail rank 0 (host 0's rank with the same local index);
* a failure on one rank becomes an error on every rank, naming that rank;
* the (host, send, receive) pieces: other hosts only, ascending, the tensors of a message in
  order, whole slots on the static wire, the first ``rows[h]`` rows on the exact wire;
* a count read blocked on a peer that never comes is reported, the stage aborted, and the call
  raises the report.

The C++ stage itself runs in tests/gpu/test_interhost_gpu.py.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from deep_ep_ops.hosts import HostLayout
from tests.dist_utils import run_ranks


class _FakeStage:
    def __init__(self, args, counts_stall=False):
        self.args = args
        self.calls = []
        self.alive = True
        self.counts_stall = counts_stall  # counts_to_host waits as for a peer that never comes
        self.aborted = threading.Event()
        self.reason = ""

    def exchange_rows(self, op, parts):
        self.calls.append((op, [(h, tuple(s.shape), tuple(r.shape), s.data_ptr(), r.data_ptr())
                                for h, s, r in parts]))

    return_partials = exchange_rows

    def counts_to_host(self, op, send, recv):
        if self.counts_stall:  # the C++ stage's sync returns once the rail is aborted
            assert self.aborted.wait(30), "the stall watch never aborted the stage"
            raise RuntimeError(f"deep_ep.{op}: aborted after a stall ({self.reason})")
        return send.tolist(), [7] * len(send)

    def abort(self, reason):
        self.reason, self.alive = reason, False
        self.aborted.set()
        return True

    def destroy(self):
        self.alive = False


class _FakeExt:
    def __init__(self, fail_rank=None, counts_stall=False):
        self.fail_rank = fail_rank
        self.counts_stall = counts_stall

    def nccl_rail_unique_id(self):
        return f"id of rank {dist.get_rank()}".encode()

    def nccl_rail_stage(self, uid, rank, num_hosts, ranks_per_host, device):
        if rank == self.fail_rank:
            raise RuntimeError("ncclCommInitRank failed: simulated")
        return _FakeStage((uid, rank, num_hosts, ranks_per_host, device), self.counts_stall)


def _make(monkeypatch_ext, L, timeout_s=30.0):
    from deep_ep_ops.cuda import extension, interhost
    extension.module = lambda: monkeypatch_ext  # this process only (a spawned rank)
    world = dist.get_world_size()
    return interhost.rail_stage(dist.group.WORLD, HostLayout(world // L, L), torch.device("cpu"),
                                timeout_s)


def _body(rank: int, world: int, L: int):
    stage = _make(_FakeExt(), L)
    uid, r, N, L_, _ = stage._stage.args
    host, local = divmod(rank, L)
    assert uid == f"id of rank {local}".encode(), uid  # rail rank 0 of rail `local`
    assert (r, N, L_) == (rank, world // L, L) and (stage.host, stage.local) == (host, local)
    peers = [h for h in range(N) if h != host]
    assert stage.peers() == peers
    M = 5
    x = torch.zeros(N, M, 3, dtype=torch.bfloat16)
    i = torch.zeros(N, M, 2, dtype=torch.int64)
    rx, ri = torch.empty_like(x), torch.empty_like(i)
    stage.exchange_rows("dispatch", [x, i], [rx, ri])
    op, parts = stage._stage.calls[-1]
    assert op == "dispatch"
    assert [(p[0], p[1], p[2]) for p in parts] == [
        (h, shape, shape) for h in peers for shape in ((M, 3), (M, 2))]
    assert [p[3] for p in parts] == [t[h].data_ptr() for h in peers for t in (x, i)]
    sent, got = stage.counts("dispatch", torch.tensor([h + 1 for h in range(N)]))
    assert sent == [h + 1 for h in range(N)] and got == [7] * N
    rows = [(h + rank) % (M + 1) for h in range(N)]
    back = [(2 * h + rank) % (M + 1) for h in range(N)]
    stage.return_partials("combine", [x], [rx], rows, back)
    op, parts = stage._stage.calls[-1]
    assert [(p[0], p[1], p[2]) for p in parts] == [
        (h, (rows[h], 3), (back[h], 3)) for h in peers], parts
    with pytest.raises(ValueError, match="host slots"):
        stage.exchange_rows("dispatch", [x[:1]], [rx[:1]])
    stage.destroy()
    assert not stage.alive
    return True


def _stalled_counts_body(rank: int, world: int):
    """The exact wire's count read blocks on a rail peer that never comes: past timeout_s the
    watch reports it and aborts the stage, whose blocked call then raises the report."""
    stage = _make(_FakeExt(counts_stall=True), 1, timeout_s=0.2)
    with pytest.raises(RuntimeError, match=r"aborted after a stall \(deep_ep.dispatch: rank "
                       rf"{rank} \(host {rank}, local index 0\) waits for .*still pending"):
        stage.counts("dispatch", torch.zeros(world, dtype=torch.int64))
    assert len(stage.watch.stalls) == 1 and not stage.alive
    stage.destroy()  # nothing left to finalize
    return True


def _failing_body(rank: int, world: int):
    with pytest.raises(RuntimeError, match=r"rank 1: ncclCommInitRank failed") as info:
        _make(_FakeExt(fail_rank=1), 1)
    return "rank 0" not in str(info.value)


@pytest.mark.parametrize("world,L", [(2, 1), (4, 2), (6, 3), (4, 1)])
def test_glue_ids_and_pieces(world: int, L: int) -> None:
    assert run_ranks(_body, world, L) == [True] * world


def test_one_rank_failing_fails_every_rank() -> None:
    assert run_ranks(_failing_body, 3) == [True] * 3




def test_stalled_count_read_is_aborted_and_raises() -> None:
    assert run_ranks(_stalled_counts_body, 2) == [True] * 2
