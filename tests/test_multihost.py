"""Dispatch / cached_dispatch / combine on groups of several hosts (Buffer(ranks_per_host=L))
against the independent reference of tests/reference.py (rows by forwarder, source host, token;
combine host-first), for 2 hosts x 2 ranks, 4 x 2 and 2 x 4; the inter-host stage's wire (one
row per (token, other destination host) in exact mode); the host-first order of sums; autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops
from deep_ep_ops import handle as H
from deep_ep_ops.cpu.interhost import wire_log
from deep_ep_ops.meta.shapes import static_capacity
from tests.dist_utils import run_ranks
from tests.reference import expected_combine, expected_dispatch, make_case
from tests.test_gradcheck import _wrap

EPS = 2.0 ** -24

CASES = [
    # E, K, M, H, A, kwargs
    (16, 3, 5, 4, 1, {}),
    (16, 4, 6, 4, 4, {"skew": True, "tokens_zero_rank": True}),
    (16, 2, 4, 8, 1, {"drop": 0.5, "dtype": torch.bfloat16}),
    (8, 2, 4, 16, 2, {"fp8": True}),
]


def _expert_fn(rows: torch.Tensor, d: int) -> torch.Tensor:
    """A stand-in for the experts (float32 for FP8 rows)."""
    out_dtype = torch.float32 if rows.dtype == torch.float8_e4m3fn else rows.dtype
    return (rows.float() * (1.5 + d) - 0.25).to(out_dtype)


def _tokens_to_host(idx: torch.Tensor, E: int, N: int, host: int) -> int:
    """Tokens of ``idx`` with at least one expert on ``host``."""
    return int(((idx >= 0) & (idx.div(E // N, rounding_mode="floor") == host)).any(-1).sum())


def _check_case(rank: int, case, L: int, expand: bool, exact: bool, name: str) -> None:
    R, N, M, K = case.R, case.R // L, case.M, case.K
    h, E_loc = rank // L, case.E // case.R
    x, idx, w = case.x[rank], case.idx[rank], case.w[rank]
    s = case.scales[rank] if case.scales else None
    where = f"rank {rank} (host {h}) {N}x{L} expand={expand} exact={exact}"
    log = wire_log(deep_ep_ops.get_buffer(name))
    log.clear()
    recv_x, recv_s, recv_idx, recv_w, tpe, handle = torch.ops.deep_ep.dispatch(
        x, s, idx, w, name, case.E, case.A, expand, exact)

    # inter-host wire: exact: one row per (token, other destination host), counts first;
    # static: M rows per rail pair
    for dst in range(N):
        if dst == h:
            continue
        want = _tokens_to_host(idx, case.E, N, dst) if exact else M
        assert log.totals("dispatch", "rows").get((h, dst)) == want, where
        assert (h, dst) in log.totals("dispatch", "counts") or not exact, where

    exp = [expected_dispatch(case, d, expand, L) for d in range(R)]
    mine = exp[rank]
    n = len(mine["rows"])
    C = n if exact else static_capacity(R, M, K, E_loc, case.A, expand)
    assert recv_x.shape == (C, case.H), where
    assert handle.shape == (1 + x.shape[0] + N * M + C, H.handle_width(K)), where
    assert torch.equal(recv_x[:n].view(torch.uint8), mine["recv_x"].view(torch.uint8)), where
    assert not recv_x[n:].float().any(), where
    if s is not None:
        assert torch.equal(recv_s[:n], mine["recv_s"]), where
    assert torch.equal(recv_idx[:n], mine["recv_idx"]), where
    assert (recv_idx[n:] == -1).all(), where
    assert torch.equal(recv_w[:n], mine["recv_w"]), where
    assert torch.equal(tpe, mine["tokens_per_expert"]), where
    header = handle[0]
    assert (int(header[H.HDR_NUM_TOKENS]), int(header[H.HDR_NUM_RANKS]),
            int(header[H.HDR_NUM_ROWS])) == (x.shape[0], R, C), where

    # the handle: each receive row names its forwarder (local index) and virtual slot, and the
    # source's rail send part names that slot for the token
    T = x.shape[0]
    sends: list = [None] * R
    dist.all_gather_object(sends, handle[1:1 + T], group=deep_ep_ops.get_buffer(name).group)
    recv = handle[1 + T + N * M:]
    for i, row in enumerate(mine["rows"]):
        if row is None:
            continue
        src, tok = row[0], row[1]
        l_src, v = int(recv[i, H.RECV_SRC_RANK]), int(recv[i, H.RECV_SRC_TOKEN])
        assert l_src == src % L and v // M == src // L, (where, i, row, l_src, v)
        slots = sends[src][tok, H.rail_dst_slot(K): H.rail_dst_slot(K) + K]
        hosts = sends[src][tok, H.RAIL_DST_HOST: H.RAIL_DST_HOST + K]
        assert v in slots[hosts == h].tolist(), (where, i, row)

    # cached dispatch reproduces the rows bitwise
    log.clear()
    cx, cs = torch.ops.deep_ep.cached_dispatch(x, s, handle, name)
    assert torch.equal(cx.view(torch.uint8), recv_x.view(torch.uint8)), where
    assert torch.equal(cs, recv_s), where
    for dst in range(N):
        if dst != h:
            want = _tokens_to_host(idx, case.E, N, dst) if exact else M
            assert log.totals("cached_dispatch", "rows").get((h, dst)) == want, where

    if x.dtype == torch.float8_e4m3fn:
        return
    ys = [_expert_fn(e["recv_x"], d) for d, e in enumerate(exp)]
    row_w = [e["recv_w"] if expand else e["recv_w"].sum(-1) for e in exp]
    y = torch.zeros(C, case.H, dtype=ys[rank].dtype)
    y[:n] = ys[rank]
    weights = torch.zeros(C)
    weights[:n] = row_w[rank]
    for use_w in (False, True):
        log.clear()
        got = torch.ops.deep_ep.combine(y, handle, weights if use_w else None, name)
        ref = expected_combine(case, rank, [e["rows"] for e in exp], ys,
                               row_w if use_w else [None] * R, y.dtype, L)
        assert torch.equal(got, ref), f"{where} weights={use_w}: max diff " \
            f"{(got.float() - ref.float()).abs().max()}"
        # one fp32 partial per (token, host) back to its source (exact), M per pair (static)
        for src_host in range(N):
            if src_host != h:
                rail_src = src_host * L + rank % L
                want = _tokens_to_host(case.idx[rail_src], case.E, N, h) if exact else M
                sent = log.totals("combine", "partials")
                assert sent.get((h, src_host)) == want, where
                assert log.totals("combine", "partials", "bytes")[(h, src_host)] == \
                    want * case.H * 4, where


def _cases_body(rank: int, R: int, L: int, num_cases: int = len(CASES)) -> None:
    for ci, (E, K, M, Hd, A, kw) in enumerate(CASES[:num_cases]):
        kw = dict(kw)
        tokens = [0] + [M] * (R - 1) if kw.pop("tokens_zero_rank", False) else None
        case = make_case(2000 + ci, R, E, K, M, Hd, A, tokens=tokens, **kw)
        buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=Hd, num_topk=K,
                                 num_experts=E, ranks_per_host=L)
        try:
            for expand in (False, True):
                for exact in (False, True):
                    _check_case(rank, case, L, expand, exact, buf.group_name)
        finally:
            buf.destroy()
    _order_body(rank, R, L)


def _order_body(rank: int, R: int, L: int) -> None:
    """Partials 1, 2^-24, 2^-24, -1 on ranks 0..3 (0 elsewhere) of rank 0's one token: host
    sums first. 2 ranks per host: (1 + e) + (e - 1) = e; 4 per host (or one): 0."""
    partials = [1.0, EPS, EPS, -1.0] + [0.0] * (R - 4)
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=1, hidden=4, num_topk=4, num_experts=R,
                             ranks_per_host=L)
    T = 1 if rank == 0 else 0
    idx = torch.arange(4).repeat(T, 1)  # rank 0's token: one expert on each of ranks 0..3
    out = torch.ops.deep_ep.dispatch(torch.ones(T, 4), None, idx, torch.ones(T, 4),
                                     buf.group_name, R)
    y = torch.full_like(out[0], partials[rank])
    got = torch.ops.deep_ep.combine(y, out[5], None, buf.group_name)
    if rank == 0:
        want = EPS if L == 2 else 0.0
        assert torch.equal(got, torch.full((1, 4), want)), (L, got[0, 0].item(), want)
    buf.destroy()


def _gradcheck(fn, inputs) -> None:
    """tests/test_gradcheck.py's check in gradcheck's fast mode (random projections of the
    Jacobian: a few calls instead of one per input and output element, which keeps the
    several-host collectives affordable)."""
    assert torch.autograd.gradcheck(_wrap(fn), inputs, eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def _gradcheck_body(rank: int, R: int, L: int) -> None:
    E, K, M, Hd, T = 2 * R, 2, 3, 2, 3  # K <= Hd: d topk_weights is a combine of [C, K] rows
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=Hd, num_topk=K, num_experts=E,
                             ranks_per_host=L)
    name, ops = buf.group_name, torch.ops.deep_ep
    g = torch.Generator().manual_seed(7)
    idx = make_case(9, R, E, K, M, Hd, 1, tokens=[T] * R).idx[rank]
    X = torch.randn(R, T, Hd, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.rand(R, T, K, generator=g, dtype=torch.float64, requires_grad=True)
    for expand, exact in ((False, True), (True, False)):
        # one row count on every rank (the test's gather needs it): the static capacity
        C_max = static_capacity(R, M, K, E // R, 2, expand)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros((C_max - t.shape[0], *t.shape[1:]))])

        def f_dispatch(x, w):
            out = ops.dispatch(x, None, idx, w, name, E, 2, expand, exact)
            return pad(out[0]), pad(out[3])
        _gradcheck(f_dispatch, (X, W))
        out = ops.dispatch(X[rank].detach(), None, idx, W[rank].detach(), name, E, 2, expand,
                           exact)
        handle, C = out[5], out[0].shape[0]
        Y = torch.randn(R, C_max, Hd, generator=g, dtype=torch.float64, requires_grad=True)
        RW = torch.rand(R, C_max, generator=g, dtype=torch.float64, requires_grad=True)
        _gradcheck(lambda y, rw: ops.combine(y[:C].contiguous(), handle, rw[:C].contiguous(),
                                             name), (Y, RW))

        def f_cached(x):
            return pad(ops.cached_dispatch(x, None, handle, name)[0])
        _gradcheck(f_cached, (X,))
    buf.destroy()


def _fake_and_errors_body(rank: int, R: int, L: int) -> None:
    """The fakes give the real shapes (one shape rule: V from the Buffer's hosts); rows of
    other dtypes on another host are named by host and rank."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    E, K, M, Hd = 8, 2, 3, 4
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=Hd, num_topk=K, num_experts=E,
                             ranks_per_host=L)
    name, ops = buf.group_name, torch.ops.deep_ep
    case = make_case(3, R, E, K, M, Hd, 1)
    x, idx, w = case.x[rank], case.idx[rank], case.w[rank]
    for expand in (False, True):
        real = ops.dispatch(x, None, idx, w, name, E, 1, expand)
        comb = ops.combine(real[0], real[5], None, name)
        cached = ops.cached_dispatch(x, None, real[5], name)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fidx, fw = (mode.from_tensor(t) for t in (x, idx, w))
            fake = ops.dispatch(fx, None, fidx, fw, name, E, 1, expand)
            assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real], rank
            assert fake[5].shape[0] == 1 + x.shape[0] + (R // L) * M + real[0].shape[0]
            assert ops.combine(fake[0], fake[5], None, name).shape == comb.shape
            assert ops.cached_dispatch(fx, None, fake[5], name)[0].shape == cached[0].shape
    # host 1 sends float64 rows, host 0 float32: each rank names its rail peer
    bad = x.double() if rank // L == 1 else x
    with pytest.raises(ValueError, match=rf"rank {rank} \(host {rank // L}, local index "
                                         rf"{rank % L}\) got rows of another kind from its "
                                         rf"rail peer rank {(rank + L) % R} \(host "):
        ops.dispatch(bad, None, idx, w, name, E, 1, False)
    buf.destroy()


def _small_body(rank: int, R: int, L: int) -> None:
    _cases_body(rank, R, L)
    _fake_and_errors_body(rank, R, L)
    _gradcheck_body(rank, R, L)


def test_two_hosts_of_two_ranks() -> None:
    run_ranks(_small_body, 4, 2)


@pytest.mark.parametrize("L", [2, 4], ids=["4x2", "2x4"])
def test_eight_ranks(L: int) -> None:
    run_ranks(_cases_body, 8, L, 2)  # -1 entries, skew, a rank with T = 0 (CI time)


def test_bench_counts_exact_rows_at_the_deduplicated_minimum(tmp_path) -> None:
    """bench/bench_multihost.py on a tiny 2 x 2 run: its report says exact = minimum per host
    pair (it raises otherwise), naive >= minimum, static = M rows per rank pair."""
    from bench import bench_multihost
    report = bench_multihost.main(["--tokens", "6", "--hidden", "8", "--topk", "3",
                                   "--experts", "8", "--topologies", "2x2",
                                   "--out", str(tmp_path)])
    pairs = report["topologies"][0]["pairs"]
    assert [p["pair"] for p in pairs] == ["0->1", "1->0"]
    for p in pairs:
        assert p["exact_rows"] == p["minimum_rows"] <= p["naive_rows"]
        assert p["static_rows"] == 2 * 6  # L rail pairs per host pair, M rows each
        assert p["exact_bytes"] == p["minimum_bytes"]
    assert list(tmp_path.glob("multihost-wire-*.md")) and list(tmp_path.glob("*.json"))
