"""CUDA dispatch / cached_dispatch / combine on groups that span hosts (deep_ep_ops.cuda.multihost),
as simulated hosts on one GPU: every rank under MPS with its own ``NCCL_HOSTID`` (so NCCL links
the rail peers through its network transport, as between real hosts), ``ranks_per_host=L``
(CUDA IPC inside each simulated host).

Every output equals the CPU reference (``deep_ep_ops.cpu.multihost`` on a gloo Buffer with the
same host layout) byte for byte: recv_x, scales, top-k, tokens_per_expert, the whole handle
``[1 + T + V + C, W]``, cached_dispatch, combine (host partials in ascending host order) for
bf16 / FP8 (+ scales) / fp32 rows, static and exact, both layouts, skew, -1 entries, a rank with
T = 0; then gradients, a CUDA graph replayed with new routing, and torch.compile fwd + bwd.
"""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.distributed as dist

from deep_ep_ops.local_ranks import MPS_CONTROL
from tests.gpu.dist_gpu import gpus, rank_device, run_gpus
from tests.gpu.test_moe_ops_gpu import _inputs, _same, check_graph_replays, moe_step

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

# name, H, K, E, M, dtype, tokens, skew, drop  (E divisible by 8 ranks)
CASES = [
    ("bf16-random", 256, 4, 16, 24, "bf16", None, False, 0.0),
    ("fp8-drop", 512, 3, 16, 16, "fp8", None, False, 0.3),
    ("fp32-skew", 128, 2, 8, 16, "fp32", "M", True, 0.0),
    ("bf16-zero-rank-drop", 256, 8, 32, 16, "bf16", "0M", False, 0.5),
]
NAMES = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights", "tokens_per_expert",
         "handle")


def _reference(buf, gloo, L):
    """A CPU Buffer with the same layout on the gloo group (its handles carry its own id: the
    comparison puts the CUDA Buffer's id in)."""
    import deep_ep_ops
    return deep_ep_ops.Buffer(gloo, num_max_tokens_per_rank=buf.num_max_tokens_per_rank,
                              hidden=buf.hidden, num_topk=buf.num_topk,
                              num_experts=buf.num_experts, ranks_per_host=L,
                              timeout_s=120.0)


def _as_cuda_buffer(handle: torch.Tensor, buf) -> torch.Tensor:
    from deep_ep_ops import handle as H
    out = handle.clone()
    out[0, H.HDR_BUFFER_ID] = buf.id
    return out


def _bitwise_body(rank, world, gloo, L):
    import deep_ep_ops
    dev = rank_device()
    for (name, H, K, E, M, dtype, tokens, skew, drop) in CASES:
        buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H,
                                 num_topk=K, num_experts=E, fp8_dispatch=dtype == "fp8",
                                 timeout_s=60.0, ranks_per_host=L)
        assert buf.multihost is not None and buf.num_hosts == world // L
        ref = _reference(buf, gloo, L)
        x, s, idx, w = _inputs(rank, world, H, K, E, M, dtype, tokens, skew, drop, 99)
        gx, gs, gidx, gw = (t.to(dev) if t is not None else None for t in (x, s, idx, w))
        for A in (1, 4):
            for expand in (False, True):
                for exact in (False, True):
                    where = (f"[{name} {world // L}x{L} rank={rank} A={A} expand={expand} "
                             f"exact={exact}]")
                    outs = torch.ops.deep_ep.dispatch(gx, gs, gidx, gw, buf.group_name, E, A,
                                                      expand, exact)
                    want = list(torch.ops.deep_ep.dispatch(x, s, idx, w, ref.group_name, E, A,
                                                           expand, exact))
                    rhandle = want[5]  # the reference's own (its Buffer's id)
                    want[5] = _as_cuda_buffer(want[5], buf)
                    for got, exp, nm in zip(outs, want, NAMES):
                        _same(got, exp, f"{where} {nm}")
                    handle = outs[5]
                    C = outs[0].shape[0]

                    x2 = (x.float() * 0.5 + 1).to(x.dtype)
                    s2 = s * 2 if s is not None else None
                    cx, cs = torch.ops.deep_ep.cached_dispatch(
                        x2.to(dev), s2.to(dev) if s2 is not None else None, handle,
                        buf.group_name)
                    rx, rs = torch.ops.deep_ep.cached_dispatch(x2, s2, rhandle, ref.group_name)
                    _same(cx, rx, f"{where} cached recv_x")
                    _same(cs, rs, f"{where} cached recv_x_scales")

                    cin = outs[0] if dtype != "fp8" else outs[0].to(torch.bfloat16)
                    cw = outs[3] if expand else None
                    got = torch.ops.deep_ep.combine(cin, handle, cw, buf.group_name)
                    exp = torch.ops.deep_ep.combine(cin.cpu(), rhandle,
                                                    cw.cpu() if cw is not None else None,
                                                    ref.group_name)
                    _same(got, exp, f"{where} combine")
                    g = torch.Generator().manual_seed(A + 7 * rank)
                    f32, rw = torch.randn(C, H, generator=g), torch.rand(C, generator=g)
                    got = torch.ops.deep_ep.combine(f32.to(dev), handle, rw.to(dev),
                                                    buf.group_name)
                    exp = torch.ops.deep_ep.combine(f32, rhandle, rw, ref.group_name)
                    _same(got, exp, f"{where} combine fp32 w")
        _grad_check(buf, ref, x, s, idx, w, dev, dtype, E, f"[{name} {world // L}x{L}]")
        torch.cuda.synchronize()
        dist.barrier(group=gloo)
        print(f"rank {rank}: {name} ok", flush=True)
        ref.destroy()
        buf.destroy()


def _grad_check(buf, ref, x, s, idx, w, dev, dtype, E, where):
    """d x (bitwise) and d topk_weights of sum(combine(dispatch(x) * 2, weights)) on CUDA equal
    the CPU reference's (float rows only: FP8 has no gradient)."""
    if dtype == "fp8":
        return

    def loss(group, xx, ww, ii):
        rx, _, _, rw, _, handle = torch.ops.deep_ep.dispatch(xx, None, ii, ww, group, E, 1,
                                                             True, False)
        y = torch.ops.deep_ep.combine(rx * 2, handle, rw, group)
        return (y.float() * torch.linspace(-1, 1, y.shape[1], device=y.device)).sum()

    gx, gw = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    loss(buf.group_name, gx, gw, idx.to(dev)).backward()
    cx, cw = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss(ref.group_name, cx, cw, idx).backward()
    _same(gx.grad, cx.grad, f"{where} d x")
    # d topk_weights holds per-row dot products over H (combine's weight gradient), summed in
    # another order by the GPU's reduction than by the CPU's: equal to rounding
    torch.testing.assert_close(gw.grad.cpu(), cw.grad, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{where} d topk_weights: {m}")


def _graph_compile_body(rank, world, gloo, L):
    """dispatch -> per-expert matmul -> combine in a CUDA graph, replayed with new tokens and
    routing (each replay equals the eager run); the same step under torch.compile(fullgraph)
    forward and backward equals eager."""
    import deep_ep_ops
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=32, hidden=128,
                             num_topk=4, num_experts=4 * world, ranks_per_host=L)
    step, new_inputs = moe_step(buf, rank, A=8)
    check_graph_replays(step, new_inputs, gloo, 20)

    def fwd_bwd(fn, x, idx, w):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out, _ = fn(xx, idx, ww)
        out.float().square().sum().backward()
        return out, xx.grad, ww.grad

    x, idx, w = new_inputs(100)
    eager = fwd_bwd(step, x, idx, w)
    compiled = fwd_bwd(torch.compile(step, fullgraph=True), x, idx, w)
    # the forward runs the same ops; Inductor fuses the expert matmuls' backward differently,
    # so the gradients agree to bf16 rounding of their largest terms (a sum of K terms that
    # cancel keeps the terms' rounding: atol scales with the gradient's magnitude)
    assert torch.equal(compiled[0].float(), eager[0].float()), "compile out differs from eager"
    for a, b, nm in zip(compiled[1:], eager[1:], ("d x", "d w")):
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2 ** -7 * scale,
                                   msg=lambda m: f"compile {nm}: {m}")
    torch.cuda.synchronize()
    dist.barrier(group=gloo)
    buf.destroy()


def _stall_body(rank, world, gloo, L):
    """After one dispatch together, host 1's ranks enter the next only after host 0's have
    checked (timeout_s = 1): host 0's ranks return from theirs (static wire: nothing waits on
    the host), their stage reports the rail peer on host 1 by rank and aborts the rail, and
    their next dispatch raises the report. Host 1's late dispatch then meets aborted peers: its
    own stage reports host 0 and aborts too. Nothing hangs; every rank destroys its Buffer."""
    import time

    import deep_ep_ops
    dev = rank_device()
    M, H, K, E = 16, 128, 2, 4 * world
    timeout_s = 1.0
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H, num_topk=K,
                             num_experts=E, timeout_s=timeout_s, ranks_per_host=L)
    h, l = divmod(rank, L)
    x = torch.randn(M, H, device=dev).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(M)])
    w = torch.rand(M, K, device=dev)
    stage = buf.multihost.stage
    # Every rank first dispatches once together: CUDA loads a process's kernels lazily, at their
    # first launch, and loading waits for the kernels running on the GPU, so a first dispatch
    # would block host 0 behind its pending rail transfer until host 1 came.
    torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, E)
    torch.cuda.synchronize()
    dist.barrier(group=gloo)

    def stalled_on(peer_host: int) -> None:
        torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, E)
        deadline = time.monotonic() + 20 * timeout_s
        while stage.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        peer = f"host {peer_host} (rank {peer_host * L + l})"
        assert len(stage.watch.stalls) == 1, stage.watch.stalls
        assert peer in stage.watch.stalls[0] and "deep_ep.dispatch" in stage.watch.stalls[0], \
            stage.watch.stalls[0]
        assert not stage.alive, "the stalled rail was not aborted"
        torch.cuda.synchronize()  # the aborted transfer ended: nothing left pending
        with pytest.raises(RuntimeError, match=r"aborted after a stall \(deep_ep\.dispatch: .*"
                           + re.escape(peer)):
            torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, E)

    if h == 0:
        stalled_on(1)
    dist.barrier(group=gloo)  # (CPU only)
    if h == 1:
        stalled_on(0)
    dist.barrier(group=gloo)
    buf.destroy()


def _skip_unless_simulated_hosts() -> None:
    if gpus() == 0:
        pytest.skip("needs a CUDA GPU")
    if shutil.which(MPS_CONTROL) is None:
        pytest.skip(f"simulated hosts share one GPU under CUDA MPS ({MPS_CONTROL} not found)")


TOPOLOGIES = [(4, 2), (8, 2), (8, 4)]  # (ranks, ranks per host): 2x2, 4x2, 2x4


@pytest.mark.parametrize("world,L", TOPOLOGIES)
def test_multihost_bitwise(world: int, L: int) -> None:
    _skip_unless_simulated_hosts()
    run_gpus(_bitwise_body, world, L, per_gpu=world)


@pytest.mark.parametrize("world,L", [(4, 2)])
def test_multihost_stalled_rank_named(world: int, L: int) -> None:
    _skip_unless_simulated_hosts()
    run_gpus(_stall_body, world, L, per_gpu=world)


@pytest.mark.parametrize("world,L", [(4, 2)])
def test_multihost_graph_compile(world: int, L: int) -> None:
    _skip_unless_simulated_hosts()
    run_gpus(_graph_compile_body, world, L, per_gpu=world)
