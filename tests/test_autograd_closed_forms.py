"""Gradients of dispatch / cached_dispatch / combine against closed forms. One body serves
both autograd implementations: the Python formulas (deep_ep_ops/autograd.py) on CPU tensors
over gloo (here, 1 to 3 ranks) and the C++ AutogradCUDA kernels (csrc/torch/
ep_autograd.cpp) on CUDA (tests/gpu/test_autograd_gpu.py, 1 and 2 GPUs).

A round trip needs no reference run: whatever rank holds a token's experts,
combine(dispatch(x).recv_x * c, handle, recv_w) at token t is sum over valid k of
w[t, k] * c * x[t], so the gradients of x and topk_weights are known per token.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

M, H, K = 96, 128, 4


def _inputs(dev, seed, E):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(M - 5, H, device=dev, generator=g, dtype=torch.float32)
    idx = torch.rand(x.shape[0], E, device=dev, generator=g).topk(K, dim=1).indices
    idx = torch.where(torch.rand(x.shape[0], K, device=dev, generator=g) < 0.25, -1, idx)
    w = torch.rand(x.shape[0], K, device=dev, generator=g)
    gy = torch.randn(x.shape[0], H, device=dev, generator=g)
    return x, idx, w, gy


def closed_form_body(rank: int, world: int, dev: torch.device) -> None:
    """Every check on this rank's tokens; the ranks call the ops in the same order."""
    import torch.distributed as dist

    import deep_ep_ops
    ops = torch.ops.deep_ep
    E = 4 * world
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H, num_topk=K,
                             num_experts=E)
    name = buf.group_name
    x0, idx, w0, gy = _inputs(dev, 7 + rank, E)
    valid = (idx >= 0).float()
    # closed forms: y[t] = 2 * sum_k valid * w[t, k] * x[t]
    want_gx = 2 * (valid * w0).sum(1, keepdim=True) * gy
    want_gw = 2 * valid * (gy * x0).sum(1, keepdim=True)

    for expand in (True, False):
        where = f"rank {rank} R={world} expand={expand}"
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        rx, _, ridx, rw, _, handle = ops.dispatch(x, None, idx, w, name, E, 1, expand, False)
        if expand:  # one row per (token, expert): the combine weights carry w
            y = ops.combine(rx * 2, handle, rw, name)
        else:       # one row per token: fold the valid weights of the row in
            y = ops.combine(rx * 2 * (rw * (ridx >= 0)).sum(1, keepdim=True), handle, None, name)
        (y * gy).sum().backward()
        torch.testing.assert_close(y.detach(), 2 * (valid * w0).sum(1, keepdim=True) * x0,
                                   rtol=1e-5, atol=1e-5, msg=where)
        torch.testing.assert_close(x.grad, want_gx, rtol=1e-5, atol=1e-5, msg=where)
        torch.testing.assert_close(w.grad, want_gw, rtol=1e-5, atol=1e-5, msg=where)

        # cached_dispatch with the same handle: d x = combine of the row gradients
        x2 = x0.clone().requires_grad_()
        rows, _ = ops.cached_dispatch(x2, None, handle, name)
        y2 = ops.combine(rows, handle, rw.detach() if expand else None, name)
        (y2 * gy).sum().backward()
        if expand:
            coef = (valid * w0).sum(1, keepdim=True)
        else:  # compact: one row per (token, destination rank), each summed once
            dst = torch.where(idx >= 0, idx // (E // world), -1)
            coef = torch.stack([(dst == d).any(1) for d in range(world)], 1).sum(
                1, keepdim=True).float()
        torch.testing.assert_close(x2.grad, coef * gy, rtol=1e-5, atol=1e-5,
                                   msg=f"{where} cached")

    # no input requires grad: the outputs carry no graph
    rx, *_ = ops.dispatch(x0, None, idx, w0, name, E)
    assert rx.grad_fn is None and not rx.requires_grad
    buf.destroy()


def _cpu_body(rank: int, world: int) -> None:
    closed_form_body(rank, world, torch.device("cpu"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_python_autograd_closed_forms(world: int) -> None:
    run_ranks(_cpu_body, world)
