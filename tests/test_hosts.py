"""Host layout of a group (deep_ep_ops/hosts.py) and combine's host-first order of sums.

Combine adds a token's partial sums inside each host (ranks ascending), then the host sums
(hosts ascending), in fp32: with partials 1, 2^-24, 2^-24, -1 on ranks 0..3 the result is 0 for
one host of 4 ranks or 4 hosts of 1 (plain ascending order: 1 + 2^-24 rounds back to 1) and
2^-24 for two hosts of 2 ((1 + 2^-24) + (2^-24 - 1) = 1 - (1 - 2^-24)).
"""
from __future__ import annotations

import pytest
import torch

import deep_ep_ops
from deep_ep_ops.hosts import HostLayout, layout_from_ids
from tests.dist_utils import run_ranks

EPS = 2.0 ** -24
PARTIALS = [1.0, EPS, EPS, -1.0]


def test_layout_from_ids_equal_consecutive_blocks() -> None:
    assert layout_from_ids(["a", "a", "b", "b"]) == HostLayout(2, 2)
    assert layout_from_ids(["a"] * 3) == HostLayout(1, 3)
    assert HostLayout(2, 4).host_of(5) == 1


@pytest.mark.parametrize("ids, shown", [
    (["a", "a", "a", "b"], r"ranks \[0, 1, 2\] on host 'a'; ranks \[3\] on host 'b'"),
    (["a", "b", "a", "b"], r"ranks \[0, 2\] on host 'a'; ranks \[1, 3\] on host 'b'"),
])
def test_layout_from_ids_names_the_hosts_that_differ(ids, shown) -> None:
    with pytest.raises(ValueError, match=r"hosts must hold the same number of consecutive "
                                         r"ranks; got " + shown):
        layout_from_ids(ids)


def _order_body(rank: int, world: int) -> None:
    H = 8
    for ranks_per_host, want in ((None, 0.0), (4, 0.0), (2, EPS), (1, 0.0)):
        buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=1, hidden=H, num_topk=4,
                                 num_experts=4, ranks_per_host=ranks_per_host)
        assert buf.ranks_per_host == (ranks_per_host or 4)
        T = 1 if rank == 0 else 0  # rank 0's one token goes to every rank (one expert each)
        x = torch.ones(T, H)
        idx = torch.arange(4).repeat(T, 1)
        recv_x, _, _, _, _, handle = torch.ops.deep_ep.dispatch(
            x, None, idx, torch.ones(T, 4), buf.group_name, 4)
        y = torch.full_like(recv_x, PARTIALS[rank])  # row 0 is rank 0's token
        out = torch.ops.deep_ep.combine(y, handle, None, buf.group_name)
        if rank == 0:
            assert out.dtype == torch.float32 and torch.equal(out, torch.full((1, H), want)), \
                (ranks_per_host, out[0, 0].item(), want)
        buf.destroy()


def test_combine_adds_inside_each_host_first() -> None:
    run_ranks(_order_body, 4)


def _bad_ranks_per_host(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match=r"ranks_per_host must be an int >= 1 dividing the "
                                         r"group size 4, got 3"):
        deep_ep_ops.Buffer(num_max_tokens_per_rank=1, hidden=8, num_topk=1, num_experts=4,
                           ranks_per_host=3)


def test_ranks_per_host_must_divide_the_group() -> None:
    run_ranks(_bad_ranks_per_host, 4)
