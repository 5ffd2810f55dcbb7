"""The CUDA backend's multi-host composition (deep_ep_ops.cuda.multihost) run on CPU tensors:
its packing, virtual tokens, handle building, host-partial sums and exact-wire memo against the
CPU reference (deep_ep_ops.cpu.multihost), with the two GPU parts stood in for: the inter-host
stage by gloo messages between rail peers (same slots, same rows), the sub-Buffer by a CPU
Buffer on the host's ranks. On a GPU the same functions run with the NCCL rail stage and the
CUDA kernels (tests/gpu/test_multihost_gpu.py); here every slot row crossing the stand-in is
also counted, so the test sees that the exact wire moves only real rows.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deep_ep_ops.cuda.multihost import _raw as raw  # FP8 as bytes, as the stage moves it
from tests.dist_utils import run_ranks

CASES = [
    # E, K, M, H, dtype, drop, zero_rank, skew
    (16, 3, 6, 8, torch.float32, 0.0, False, False),
    (16, 4, 5, 4, torch.bfloat16, 0.4, True, False),
    (8, 2, 4, 64, torch.float8_e4m3fn, 0.2, False, False),
    # every token of every rank on experts 0 and 1: rank 0's exact rows fill the static
    # capacity while the others receive none (the ranks must still agree on the exact wire)
    (8, 2, 4, 8, torch.float32, 0.0, False, True),
]


class GlooSlotStage:
    """RailStage's interface (deep_ep_ops.cuda.interhost) over gloo: slot h' of each send
    tensor to host h''s rail peer, whole or its first rows[h'] rows; counts rows moved."""

    def __init__(self, group, rank: int, N: int, L: int) -> None:
        self.group, self.rank, self.N, self.L = group, rank, N, L
        self.host, self.local = divmod(rank, L)
        self.rows_moved = 0

    def _swap(self, send, recv, send_rows, recv_rows) -> None:
        ops = []
        for g in range(self.N):
            if g == self.host:
                continue
            peer = g * self.L + self.local
            for s, r in zip(send, recv):
                n_out = s.shape[1] if send_rows is None else send_rows[g]
                n_in = r.shape[1] if recv_rows is None else recv_rows[g]
                self.rows_moved += n_out
                if n_out:
                    ops.append(dist.P2POp(dist.isend, raw(s[g, :n_out]).contiguous(), peer,
                                          self.group))
                if n_in:
                    ops.append(dist.P2POp(dist.irecv, raw(r[g, :n_in]), peer, self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()

    def exchange_rows(self, op, send, recv, send_rows=None, recv_rows=None) -> None:
        self._swap(send, recv, send_rows, recv_rows)

    def return_partials(self, op, send, recv, send_rows=None, recv_rows=None) -> None:
        self._swap(send, recv, send_rows, recv_rows)

    def counts(self, op, send_counts):
        got = torch.zeros(self.N, 1, dtype=torch.int64)
        self._swap([send_counts.view(self.N, 1, 1)], [got.view(self.N, 1, 1)], None, None)
        self.rows_moved -= self.N - 1  # counts are not rows
        return [int(c) for c in send_counts], [int(c) for c in got.flatten()]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _body(rank: int, world: int, L: int) -> None:
    import types

    import deep_ep_ops
    from deep_ep_ops import handle as Hd
    from deep_ep_ops import validation as V
    from deep_ep_ops.cuda import multihost as mh
    from deep_ep_ops.hosts import RankPlace
    from deep_ep_ops.trim import trim_dispatch

    N = world // L
    h = rank // L
    host_group = dist.new_group(list(range(h * L, (h + 1) * L)), use_local_synchronization=True)
    for E, K, M, H, dtype, drop, zero_rank, skew in CASES:
        fp8 = dtype == torch.float8_e4m3fn
        ref = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=H, num_topk=K,
                                 num_experts=E, ranks_per_host=L, fp8_dispatch=fp8)
        inner = deep_ep_ops.Buffer(host_group, num_max_tokens_per_rank=N * M, hidden=H,
                                   num_topk=K, num_experts=E // N, ranks_per_host=L,
                                   fp8_dispatch=fp8)
        stage = GlooSlotStage(dist.group.WORLD, rank, N, L)
        state = mh.MultiHostState(RankPlace(N, L, h, rank % L, M), inner, stage)
        # what the composition reads of its Buffer; handles carry the reference's id
        buf = types.SimpleNamespace(multihost=state, rank=rank, world_size=world, id=ref.id,
                                    num_topk=K, num_experts=E)
        g = torch.Generator().manual_seed(17 * rank + E + K)
        T = 0 if zero_rank and rank == 0 else int(torch.randint(0, M + 1, (1,), generator=g))
        T = M if skew else T
        idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
        idx = torch.arange(K).repeat(T, 1) if skew else idx
        idx = torch.where(torch.rand(T, K, generator=g) < drop, -1, idx)
        w = torch.rand(T, K, generator=g)
        x = (torch.randn(T, H, generator=g) * 3).to(dtype)
        s = torch.rand(T, 2, generator=g) + 0.5 if fp8 else None
        for A, expand, exact in ((1, False, False), (4, True, False), (1, False, True),
                                 (2, True, True)):
            where = f"rank {rank} {N}x{L} E={E} K={K} A={A} expand={expand} exact={exact}"
            stage.rows_moved = 0
            got = mh.dispatch_static(buf, x, s, idx, w, E, A, expand, 0, exact)
            moved = stage.rows_moved
            want = torch.ops.deep_ep._dispatch_static(x, s, idx, w, ref.group_name, E, A,
                                                      expand, 0)
            if exact:
                trimmed = trim_dispatch(*got)
                mh.record_trimmed_handle(got[5], trimmed[5])
                got, want = trimmed, trim_dispatch(*want)
            for a, b, nm in zip(got, want, ("recv_x", "scales", "idx", "w", "tpe", "handle")):
                assert a.dtype == b.dtype and a.shape == b.shape, f"{where} {nm}"
                assert torch.equal(_bytes(a), _bytes(b)), f"{where} {nm}"
            # rail rows: exact: one per (token, other host with one of its experts); static: M
            to = [int(((idx >= 0) & (idx // (E // N) == g)).any(-1).sum()) for g in range(N)]
            rail = [(to[g] if exact else M) for g in range(N) if g != h]
            parts = 3 + (s is not None)  # tensors per rail row: idx, x, w (+ scales)
            assert moved == parts * sum(rail), f"{where}: {moved} rows moved, not {rail}"
            handle = got[5]
            C = got[0].shape[0]
            # the header facts remembered for the checks equal what the header holds
            made = mh.recorded_header(handle)
            for col in (Hd.HDR_BUFFER_ID, Hd.HDR_NUM_RANKS, Hd.HDR_TOPK, Hd.HDR_NUM_TOKENS,
                        Hd.HDR_NUM_ROWS):
                assert made[col] == int(handle[0, col]), f"{where} recorded header col {col}"
            assert mh.recorded_header(handle.clone()) is None
            V.check_recorded_header("combine", ref, made, C)
            with pytest.raises(ValueError, match=rf"x has {C + 1} rows, the handle's dispatch "
                               rf"produced {C}"):
                V.check_recorded_header("combine", ref, made, C + 1)

            x2 = (x.float() - 1).to(dtype)
            cx, cs = mh.cached_dispatch(buf, x2, s, handle, 0)
            rx, rs = torch.ops.deep_ep.cached_dispatch(x2, s, want[5], ref.group_name)
            assert torch.equal(_bytes(cx), _bytes(rx)), f"{where} cached"
            assert torch.equal(cs, rs), f"{where} cached scales"

            rows = torch.randn(C, H, generator=g).to(torch.bfloat16)
            cw = got[3] if expand else torch.rand(C, generator=g)
            exp = torch.ops.deep_ep.combine(rows, want[5], cw, ref.group_name)
            came_in = [int((handle[1 + T + g * M:1 + T + (g + 1) * M, 0] > 0).sum())
                       for g in range(N) if g != h]
            # the dispatch's own handle (its wire remembered) and a clone (the wire and the
            # counts read from its header and rows)
            for hd in (handle, handle.clone()):
                stage.rows_moved = 0
                out = mh.combine(buf, rows, hd, cw, 0)
                # the partials go back the way the rows came: exact: as many as came in
                want_rows = sum(came_in) if exact else (N - 1) * M
                assert stage.rows_moved == want_rows, f"{where}: {stage.rows_moved} partials"
                assert torch.equal(out.view(torch.int16), exp.view(torch.int16)), \
                    f"{where} combine"
        dist.barrier()
        inner.destroy()
        ref.destroy()


@pytest.mark.parametrize("world,L", [(4, 2), (4, 1), (8, 2)])
def test_composition_matches_reference(world: int, L: int) -> None:
    run_ranks(_body, world, L)
