"""Which transport a Buffer takes, and the errors when the one asked for cannot serve the group.

* one rank: ``auto`` takes the NCCL window (its LSA team of one covers the group); ``ipc`` works
  too and a dispatch -> combine round trip through it equals the one through the NCCL window;
* several ranks on one GPU (MPS, a distinct NCCL_HOSTID each): ``auto`` takes CUDA IPC;
  ``transport="nccl"`` raises a ValueError saying that the group spans hosts, on every rank,
  before any allocation; mismatched requests between ranks raise on every rank too.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gpu.dist_gpu import gpus, rank_device, run_on_gpus

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")


def _round_trip(buf, rank: int) -> torch.Tensor:
    dev = rank_device()
    g = torch.Generator().manual_seed(rank)
    T, H, K, E = 32, 256, 2, buf.num_experts
    x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    recv_x, _, _, recv_w, _, handle = torch.ops.deep_ep.dispatch(
        x, None, idx, w, buf.group_name, E, 1, True, False)
    return torch.ops.deep_ep.combine(recv_x, handle, recv_w, buf.group_name)


def _body(rank: int, world: int, gloo) -> None:
    import deep_ep_ops
    kw = dict(num_max_tokens_per_rank=32, hidden=256, num_topk=2, num_experts=4 * world)
    shares_gpu = world > torch.cuda.device_count()
    buf = deep_ep_ops.Buffer(**kw)
    expected = "ipc" if shares_gpu else "nccl"
    assert buf.transport == expected, (buf.transport, expected)
    auto_out = _round_trip(buf, rank)
    buf.destroy()
    buf = deep_ep_ops.Buffer(transport="ipc", **kw)
    assert buf.transport == "ipc"
    ipc_out = _round_trip(buf, rank)
    assert torch.equal(auto_out.view(torch.int16), ipc_out.view(torch.int16))
    buf.destroy()
    if shares_gpu:
        with pytest.raises(ValueError, match=r"spans \d+ hosts"):
            deep_ep_ops.Buffer(transport="nccl", **kw)
        # a request that differs between ranks fails on every rank, nobody waits
        with pytest.raises(ValueError, match="same transport"):
            deep_ep_ops.Buffer(transport="ipc" if rank == 0 else "auto", **kw)
    torch.cuda.synchronize()
    dist.barrier(group=gloo)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_transport_choice_and_errors(world: int) -> None:
    run_on_gpus(_body, world)
