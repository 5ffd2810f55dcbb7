"""The CUDA inter-host stage (deep_ep_ops.cuda.interhost, csrc/interhost/) on simulated hosts.

Every rank runs on one GPU under MPS with its own ``NCCL_HOSTID`` (deep_ep_ops.local_ranks), so
NCCL sees R hosts and the rail communicator goes through its network transport, as between real
hosts; the host layout is ``ranks_per_host=L``. Rank (h, l) sends host h' rows that depend on
(source rank, destination host, round), and checks what arrives from each rail peer byte for
byte: the static wire eagerly and replayed from a captured CUDA graph (new data each replay),
the exact wire (counts first, then only the real rows, the rest of each slot untouched), and
the combine direction. (The ops on top of it: test_multihost_gpu.py.)
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from deep_ep_ops.local_ranks import MPS_CONTROL
from tests.gpu.dist_gpu import capture_graph, gpus, rank_device, run_gpus

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

M, H, K, W, E = 8, 192, 4, 96, 64  # rail rows per slot, row width, top-k, partial width
SENTINEL = -7


def _rows(src_rank: int, dst_host: int, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``src_rank`` sends host ``dst_host`` in round ``round_``: bf16 rows [M, H] and
    top-k ids [M, K] (CPU; the same on every rank)."""
    g = torch.Generator().manual_seed(1_000_003 * round_ + 1009 * src_rank + dst_host)
    return (torch.randn(M, H, generator=g).to(torch.bfloat16),
            torch.randint(-1, E, (M, K), generator=g))


def _partials(src_rank: int, dst_host: int, round_: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7_000_001 * round_ + 31 * src_rank + dst_host + 5)
    return torch.randn(M, W, generator=g)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (NaN-safe; bf16 compared as int16)."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.uint8), b.view(torch.uint8))


class _Slots:
    """Send / receive slot tensors [N, M, ...] of one rank and their expected contents."""

    def __init__(self, stage, dev):
        self.stage, self.dev = stage, dev
        N = stage.num_hosts
        self.sx = torch.full((N, M, H), SENTINEL, dtype=torch.bfloat16, device=dev)
        self.si = torch.full((N, M, K), SENTINEL, dtype=torch.int64, device=dev)
        self.rx, self.ri = torch.empty_like(self.sx), torch.empty_like(self.si)
        self.sp = torch.full((N, M, W), SENTINEL, dtype=torch.float32, device=dev)
        self.rp = torch.empty_like(self.sp)
        self.reset()

    def reset(self) -> None:
        for t in (self.rx, self.ri, self.rp):
            t.fill_(SENTINEL)

    def fill(self, round_: int) -> None:
        """Fill the send slots in place (graph replays read the same memory)."""
        s = self.stage
        for h in s.peers():
            x, i = _rows(s.rank, h, round_)
            self.sx[h].copy_(x)
            self.si[h].copy_(i)
            self.sp[h].copy_(_partials(s.rank, h, round_))

    def check(self, round_: int, rows=None, partial_rows=None) -> None:
        """What arrived from every rail peer: the first ``rows[h]`` rows (all M when None) as
        sent, the rest of the slot untouched; the own host's slot untouched."""
        s = self.stage
        L = s.layout.ranks_per_host
        for h in range(s.num_hosts):
            n = M if rows is None else rows[h]
            n_p = M if partial_rows is None else partial_rows[h]
            if h == s.host:
                n = n_p = 0
                x = torch.zeros(M, H, dtype=torch.bfloat16)
                i = torch.zeros(M, K, dtype=torch.int64)
                p = torch.zeros(M, W)
            else:
                peer = h * L + s.local
                x, i = _rows(peer, s.host, round_)
                p = _partials(peer, s.host, round_)
            where = f"rank {s.rank} round {round_} from host {h}"
            for got, want, count in ((self.rx[h], x, n), (self.ri[h], i, n), (self.rp[h], p, n_p)):
                assert _same(got[:count], want[:count]), f"{where}: rows differ"
                rest = got[count:].cpu()
                assert bool((rest == SENTINEL).all()), f"{where}: rows past {count} written"

    def exchange(self, rows=None, sent=None) -> None:
        """Dispatch direction, then the combine direction back. Exact wire: ``sent[h]`` rows go
        to host h, ``rows[h]`` come from it; None: whole slots (static wire)."""
        s = self.stage
        s.exchange_rows("dispatch", [self.sx, self.si], [self.rx, self.ri], sent, rows)
        # back the way the rows came: as many partials to each host as rows came from it
        s.return_partials("combine", [self.sp], [self.rp], rows, sent)


def _body(rank: int, world: int, gloo, L: int) -> None:
    from deep_ep_ops.cuda import interhost
    from deep_ep_ops.hosts import group_layout

    assert os.environ.get("NCCL_HOSTID"), "simulated hosts need a distinct NCCL_HOSTID per rank"
    group = dist.group.WORLD
    layout = group_layout(group, L)
    dev = rank_device()
    stage = interhost.rail_stage(group, layout)
    assert stage.alive and stage.host == rank // L and stage.num_hosts == world // L
    slots = _Slots(stage, dev)

    # static wire, eager
    slots.fill(0)
    slots.exchange()
    torch.cuda.synchronize()
    slots.check(0)

    # static wire in a CUDA graph: capture once, replay with new data in the same memory
    graph, _ = capture_graph(slots.exchange, before_capture=lambda: dist.barrier(group=gloo))
    for round_ in (1, 2):
        slots.fill(round_)
        slots.reset()
        graph.replay()
        torch.cuda.synchronize()
        slots.check(round_)
    del graph

    # exact wire: counts first (one sync), then only the real rows; the partials come back in
    # the reverse counts (what combine knows from the handle)
    def count(src: int, dst_host: int) -> int:
        return (3 * src + dst_host + 1) % (M + 1)
    want_sent = [0 if h == stage.host else count(rank, h) for h in range(stage.num_hosts)]
    want_got = [0 if h == stage.host else count(h * L + stage.local, stage.host)
                for h in range(stage.num_hosts)]
    slots.fill(3)
    slots.reset()
    sent, got = stage.counts("dispatch", torch.tensor(want_sent, dtype=torch.int64, device=dev))
    assert (sent, got) == (want_sent, want_got), (rank, sent, got, want_sent, want_got)
    slots.exchange(rows=got, sent=sent)
    torch.cuda.synchronize()
    # rows came in `got` counts; the partials came back in `sent` counts
    slots.check(3, rows=got, partial_rows=sent)

    # errors name the rank, its host and the peer
    peer_host = stage.peers()[0]
    cpu = torch.zeros(4)
    with pytest.raises(ValueError, match=rf"rank {rank} \(host {stage.host}, .*host {peer_host}"):
        stage._stage.exchange_rows("dispatch", [(peer_host, cpu, cpu)])
    with pytest.raises(ValueError, match="host slots"):
        stage.exchange_rows("dispatch", [slots.sx[:1]], [slots.rx[:1]])

    dist.barrier(group=gloo)
    stage.destroy()
    assert not stage.alive
    with pytest.raises(RuntimeError, match="destroyed"):
        slots.exchange()


@pytest.mark.parametrize("world,L", [(2, 1), (4, 2), (4, 1)])
def test_rail_stage_static_graph_exact(world: int, L: int) -> None:
    # every rank on one GPU: each gets its own NCCL_HOSTID, so NCCL sees `world` hosts
    if gpus() == 0:
        pytest.skip("needs a CUDA GPU")
    if shutil.which(MPS_CONTROL) is None:
        pytest.skip(f"simulated hosts share one GPU under CUDA MPS ({MPS_CONTROL} not found)")
    assert world % L == 0 and world // L > 1
    run_gpus(_body, world, L, per_gpu=world)
