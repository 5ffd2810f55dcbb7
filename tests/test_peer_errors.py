"""CPU reference: a rank that waits for a peer gives up after Buffer(timeout_s=) and names the
op and the peer; a peer in another op, or with another Buffer, is named at once.

Each Buffer lives on a group of its own (dist.new_group): a timeout closes that group's
connections on the waiting rank, and the harness still needs the default group afterwards.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import deep_ep_ops
from deep_ep_ops.errors import PeerError, PeerMismatchError
from tests.dist_utils import run_ranks

E, K, M, HID = 6, 2, 4, 8


def _buffer(timeout_s: float, max_tokens: int = M) -> deep_ep_ops.Buffer:
    group = dist.new_group(backend="gloo")
    return deep_ep_ops.Buffer(group, num_max_tokens_per_rank=max_tokens, hidden=HID,
                              num_topk=K, num_experts=E, timeout_s=timeout_s)


def _dispatch(buf: deep_ep_ops.Buffer):
    x, idx = torch.randn(3, HID), torch.tensor([[0, 1], [2, 3], [1, -1]])
    return torch.ops.deep_ep.dispatch(x, None, idx, torch.rand(3, K), buf.group_name, E)


def _timed(fn):
    start = time.monotonic()
    try:
        fn()
    except PeerError as exc:
        return exc, time.monotonic() - start
    raise AssertionError("no PeerError raised")


def _skipped_dispatch(rank: int, world: int) -> dict:
    buf = _buffer(timeout_s=5)
    if rank == 0:
        exc, waited = _timed(lambda: _dispatch(buf))
        return dict(kind=type(exc).__name__, message=str(exc), peers=exc.peers, op=exc.op,
                    waited=waited, is_timeout=isinstance(exc, TimeoutError))
    return {}  # rank 1 never enters the dispatch


def test_stalled_peer_times_out_naming_it() -> None:
    result = run_ranks(_skipped_dispatch, 2)[0]
    assert result["kind"] == "PeerTimeoutError" and result["is_timeout"], result
    assert result["op"] == "dispatch" and result["peers"] == [1], result
    assert result["message"].startswith(
        "deep_ep.dispatch: rank 0 waited 5 s (Buffer timeout_s) for rank(s) [1] of group"), \
        result["message"]
    assert 4.5 < result["waited"] < 15, result["waited"]


def _two_wait_for_a_third(rank: int, world: int) -> dict:
    buf = _buffer(timeout_s=3)
    if rank < 2:
        exc, waited = _timed(lambda: _dispatch(buf))
        dist.barrier()  # the late rank starts only now
        return dict(kind=type(exc).__name__, peers=exc.peers, waited=waited, message=str(exc))
    dist.barrier()
    # Both peers gave up on this rank and closed their connections to it: it learns at once.
    exc, waited = _timed(lambda: _dispatch(buf))
    return dict(kind=type(exc).__name__, peers=exc.peers, waited=waited, message=str(exc))


def test_every_waiting_rank_names_the_missing_one_and_the_late_one_fails_fast() -> None:
    results = run_ranks(_two_wait_for_a_third, 3)
    for rank in (0, 1):
        r = results[rank]
        assert r["kind"] == "PeerTimeoutError" and r["peers"] == [2], (rank, r)
        assert 2.5 < r["waited"] < 10, (rank, r)
    late = results[2]
    assert late["kind"] == "PeerError" and late["peers"] == [0, 1], late
    assert "deep_ep.dispatch: rank 2 lost the connection to rank(s) [0, 1]" in late["message"]
    assert late["waited"] < 3, late


def _different_ops_then_buffers(rank: int, world: int) -> dict:
    buf = _buffer(timeout_s=30)
    start = time.monotonic()
    try:
        if rank == 0:
            _dispatch(buf)
        else:
            torch.ops.deep_ep.cp_all_gather(torch.ones(2), buf.group_name)
        raise AssertionError("no PeerMismatchError")
    except PeerMismatchError as exc:
        mismatch, waited = str(exc), time.monotonic() - start
    # the mismatch left the connections clean: the next op works
    gathered = torch.ops.deep_ep.cp_all_gather(torch.full((2,), float(rank)), buf.group_name)
    # tensors that disagree between ranks: ValueError, and the connections stay clean
    group, shapes = buf.group_name, []
    try:
        torch.ops.deep_ep.cp_all_gather(torch.ones(2 + rank), buf.group_name)
    except ValueError as exc:
        shapes.append(str(exc))
    try:
        torch.ops.deep_ep.pp_send_recv(torch.ones(2), 1 - rank, 1 - rank, [2 + rank],
                                       torch.float32, buf.group_name)
    except ValueError as exc:
        shapes.append(str(exc))
    buf.destroy()
    other = _buffer(timeout_s=30, max_tokens=M + rank)  # a Buffer that differs by rank
    try:
        torch.ops.deep_ep.cp_all_gather(torch.ones(2), other.group_name)
        raise AssertionError("no ValueError")
    except ValueError as exc:
        config = str(exc)
    other.destroy()
    return dict(mismatch=mismatch, waited=waited, gathered=gathered.tolist(), config=config,
                shapes=shapes, group=group)


def test_peer_in_another_op_or_with_another_buffer_is_named() -> None:
    r0, r1 = run_ranks(_different_ops_then_buffers, 2)
    assert r0["mismatch"].startswith("deep_ep.dispatch: rank 1 entered deep_ep.cp_all_gather "
                                     "while rank 0 entered deep_ep.dispatch"), r0["mismatch"]
    assert r1["mismatch"].startswith("deep_ep.cp_all_gather: rank 0 entered deep_ep.dispatch "
                                     "while rank 1 entered deep_ep.cp_all_gather"), r1
    assert r0["waited"] < 10 and r1["waited"] < 10
    assert r0["gathered"] == r1["gathered"] == [0.0, 0.0, 1.0, 1.0]
    assert "num_max_tokens_per_rank=5 on rank 1 but 4 here (rank 0)" in r0["config"], r0
    assert "num_max_tokens_per_rank=4 on rank 0 but 5 here (rank 1)" in r1["config"], r1
    cp = ("deep_ep.cp_all_gather: x must have the same shape and dtype on every rank of "
          f"{r0['group']!r}; got shapes [(2,), (3,)]")
    assert r0["shapes"] == [cp], r0["shapes"]  # rank 0 got the 2 floats it expected
    assert r1["shapes"] == [cp, "deep_ep.pp_send_recv: rank 0 sends shape (2,) torch.float32 "
                            "but rank 1 expects recv_shape (3,) torch.float32"], r1["shapes"]
