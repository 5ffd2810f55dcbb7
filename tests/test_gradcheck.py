"""float64 gradcheck of every differentiable op on 1, 2 and 3 gloo ranks.

Every rank holds the inputs of all ranks (same seed) and feeds its own slice to the op; the
outputs of all ranks are gathered. So each rank checks the full cross-rank Jacobian, and all
ranks make the same calls in the same order (collectives stay in lockstep). Two test-only
autograd wrappers make the replicated tensors' gradients exact: ``_replicated_input`` sums
the slice gradients of all ranks, ``_gather_outputs`` hands each rank's output its own part of
the incoming gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import deep_ep_ops
from tests.dist_utils import run_ranks
from tests.reference import make_case

ops = torch.ops.deep_ep


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g


class _GatherOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, y.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        return g[dist.get_rank()].contiguous()


def _wrap(fn):
    """fn(*my_slices) -> tensor(s); returns the globally checkable function."""
    def wrapped(*global_inputs):
        rank = dist.get_rank()
        mine = [_ReplicatedInput.apply(t)[rank] for t in global_inputs]
        out = fn(*mine)
        outs = out if isinstance(out, tuple) else (out,)
        return tuple(_GatherOutputs.apply(o) for o in outs)
    return wrapped


def _gradcheck(fn, inputs) -> None:
    assert torch.autograd.gradcheck(_wrap(fn), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _body(rank: int, R: int) -> None:
    E, K, M, Hd, T = 6, 2, 3, 2, 3
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=Hd, num_topk=K, num_experts=E)
    name = buf.group_name
    g = torch.Generator().manual_seed(11)
    case = make_case(5, R, E, K, M, Hd, 1, tokens=[T] * R)
    idx = case.idx[rank]
    X = torch.randn(R, T, Hd, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.rand(R, T, K, generator=g, dtype=torch.float64, requires_grad=True)

    for expand in (False, True):
        def f_dispatch(x, w):
            out = ops.dispatch(x, None, idx, w, name, E, 2, expand)
            return out[0], out[3]
        _gradcheck(f_dispatch, (X, W))

        out = ops.dispatch(X[rank].detach(), None, idx, W[rank].detach(), name, E, 2, expand)
        handle, C = out[5], out[0].shape[0]
        Y = torch.randn(R, C, Hd, generator=g, dtype=torch.float64, requires_grad=True)
        RW = torch.rand(R, C, generator=g, dtype=torch.float64, requires_grad=True)

        def f_combine(y, rw):
            return ops.combine(y, handle, rw, name)
        _gradcheck(f_combine, (Y, RW))

        def f_cached(x):
            return ops.cached_dispatch(x, None, handle, name)[0]
        _gradcheck(f_cached, (X,))

    n = 4
    buf.engram_table(n, Hd, torch.float64)
    TB = torch.randn(R, n, Hd, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(-1, R * n, (3, 2), generator=g)
    indices[0] = torch.tensor([1, 1])  # one row fetched twice: gradients must add up

    def f_engram(tb):
        return ops.engram_fetch(tb, indices, name)
    _gradcheck(f_engram, (TB,))

    S = torch.randn(R, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f_pp(s):
        return ops.pp_send_recv(s, (rank + 1) % R, (rank - 1) % R, [2, 3], torch.float64, name)
    _gradcheck(f_pp, (S,))

    G = torch.randn(R, 2 * R, 3, generator=g, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda x: ops.cp_all_gather(x, name), (G,))
    _gradcheck(lambda x: ops.cp_reduce_scatter(x, name), (G,))
    buf.destroy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_gradcheck(world_size: int) -> None:
    run_ranks(_body, world_size)
