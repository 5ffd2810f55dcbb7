"""Dispatch / cached_dispatch / combine on 1, 2 and 3 gloo ranks against the independent
single-process reference in tests/reference.py."""
from __future__ import annotations

import pytest
import torch

import deep_ep_ops
from deep_ep_ops import handle as H
from deep_ep_ops.meta.shapes import static_capacity
from tests.dist_utils import run_ranks
from tests.reference import expected_combine, expected_dispatch, make_case


def _expert_fn(rows: torch.Tensor, d: int) -> torch.Tensor:
    """A stand-in for the experts: any fixed function of the rows works."""
    return (rows.float() * (1.5 + d) - 0.25).to(rows.dtype if rows.dtype.is_floating_point
                                                and rows.dtype != torch.float8_e4m3fn
                                                else torch.float32)


def _check_case(rank: int, case, expand: bool, exact: bool) -> None:
    E_loc = case.E // case.R
    buf = deep_ep_ops.get_buffer(_GROUP[0])
    x, idx, w = case.x[rank], case.idx[rank], case.w[rank]
    s = case.scales[rank] if case.scales else None
    out = torch.ops.deep_ep.dispatch(x, s, idx, w, buf.group_name, case.E, case.A, expand,
                                     exact)
    recv_x, recv_s, recv_idx, recv_w, tpe, handle = out
    exp = [expected_dispatch(case, d, expand) for d in range(case.R)]
    mine = exp[rank]
    n = len(mine["rows"])
    C = n if exact else static_capacity(case.R, case.M, case.K, E_loc, case.A, expand)
    where = f"rank {rank} expand={expand} exact={exact}"
    assert recv_x.shape == (C, case.H), where
    assert handle.shape == (1 + x.shape[0] + C, H.handle_width(case.K)), where
    # data rows bitwise; padding and unused capacity zero
    assert torch.equal(recv_x[:n].view(torch.uint8), mine["recv_x"].view(torch.uint8)), where
    assert not recv_x[n:].float().any(), where
    if s is not None:
        assert torch.equal(recv_s[:n], mine["recv_s"]), where
    else:
        assert recv_s.shape == (C, 0)
    assert torch.equal(recv_idx[:n], mine["recv_idx"]), where
    assert (recv_idx[n:] == -1).all(), where
    assert torch.equal(recv_w[:n], mine["recv_w"]), where
    assert not recv_w[n:].any(), where
    assert torch.equal(tpe, mine["tokens_per_expert"]), where

    # cached dispatch reproduces the rows bitwise
    cx, cs = torch.ops.deep_ep.cached_dispatch(x, s, handle, buf.group_name)
    assert torch.equal(cx.view(torch.uint8), recv_x.view(torch.uint8)), where
    assert torch.equal(cs, recv_s), where

    # the send part points at rows whose receive part names this token
    send = handle[1: 1 + x.shape[0]]
    recv_parts: list = [None] * case.R
    torch.distributed.all_gather_object(recv_parts, handle[1 + x.shape[0]:], group=buf.group)
    K = case.K
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(idx[t, k])
            dst, row = int(send[t, 1 + k]), int(send[t, 1 + K + k])
            if e < 0:
                assert dst == -1 and row == -1, where
                continue
            assert dst == e // E_loc, where
            r = recv_parts[dst][row]
            assert (int(r[H.RECV_SRC_RANK]), int(r[H.RECV_SRC_TOKEN])) == (rank, t), where
            if expand:
                assert int(r[H.RECV_TOPK_SLOT]) == k, where

    if x.dtype == torch.float8_e4m3fn:
        return
    # combine, unweighted and weighted, bitwise against the fixed-order reference
    ys = [_expert_fn(e["recv_x"], d) for d, e in enumerate(exp)]
    if expand:
        row_w = [e["recv_w"] for e in exp]
    else:
        row_w = [e["recv_w"].sum(-1) for e in exp]
    y = torch.zeros(C, case.H, dtype=ys[rank].dtype)
    y[:n] = ys[rank]
    weights = torch.zeros(C)
    weights[:n] = row_w[rank]
    for use_w in (False, True):
        got = torch.ops.deep_ep.combine(y, handle, weights if use_w else None, buf.group_name)
        ref = expected_combine(case, rank, [e["rows"] for e in exp], ys,
                               row_w if use_w else [None] * case.R, y.dtype)
        assert torch.equal(got, ref), f"{where} weights={use_w}: max diff " \
            f"{(got.float() - ref.float()).abs().max()}"


_GROUP = [None]

CASES = [
    # (R-independent knobs) E, K, M, H, A, kwargs
    (6, 2, 7, 8, 1, {}),
    (6, 1, 5, 4, 1, {"drop": 0.5}),
    (12, 8, 6, 4, 16, {}),
    (6, 3, 9, 4, 128, {"skew": True}),
    (6, 4, 6, 16, 1, {"fp8": True}),
    (24, 5, 8, 4, 16, {"tokens_zero_rank": True}),
    (6, 6, 4, 4, 1, {"drop": 0.0, "dtype": torch.bfloat16}),
    (6, 2, 5, 4, 1, {"tokens_zero_all": True}),
    (6, 1, 6, 4, 16, {"skew": True, "drop": 0.0}),  # K=1: every token to expert 0
    (24, 7, 5, 4, 1, {}),
]

# Larger groups (the R = 4 and R = 8 code paths; 8 processes on a 2-core CI machine).
WIDE_CASES = [
    (24, 8, 6, 4, 16, {}),
    (16, 3, 5, 4, 1, {"skew": True, "tokens_zero_rank": True}),
]


def _body(rank: int, R: int, cases=None) -> None:
    for ci, (E, K, M, Hd, A, kw) in enumerate(cases or CASES):
        kw = dict(kw)
        tokens = None
        if kw.pop("tokens_zero_rank", False):
            tokens = [0] + [M] * (R - 1)
        if kw.pop("tokens_zero_all", False):
            tokens = [0] * R
        case = make_case(1000 + ci, R, E, min(K, E), M, Hd, A, tokens=tokens, **kw)
        buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=Hd, num_topk=case.K,
                                 num_experts=E)
        _GROUP[0] = buf.group_name
        try:
            for expand in (False, True):
                for exact in (False, True):
                    _check_case(rank, case, expand, exact)
        finally:
            buf.destroy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dispatch_combine_semantics(world_size: int) -> None:
    run_ranks(_body, world_size)


@pytest.mark.parametrize("world_size", [4, 8])
def test_dispatch_combine_semantics_wide(world_size: int) -> None:
    run_ranks(_body, world_size, WIDE_CASES)
