"""CUDA dispatch / cached_dispatch / combine against the CPU reference (deep_ep_ops.cpu), bit
for bit, on 1 and 2 GPUs; CUDA-graph capture and replay; GPU-side timeouts.

Every rank computes its CUDA outputs and the reference over a gloo group on CPU copies of the
same inputs, then compares bytes (data, scales, routing tensors, handle, combine output).
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from tests.gpu.dist_gpu import capture_graph, gpus, rank_device, run_on_gpus

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

# (name, H, K, E, M, dtype, tokens per rank (None = random in [0, M]), A values, skew, drop)
CASES = [
    ("bf16-h2048-k8-e256", 2048, 8, 256, 512, "bf16", None, (1, 16), False, 0.2),
    ("fp8-h4096-k4-e16", 4096, 4, 16, 300, "fp8", None, (16,), False, 0.1),
    ("fp8-h7168-k8-e256-full", 7168, 8, 256, 4096, "fp8", "M", (128,), False, 0.0),
    ("bf16-h7680-k1-e2-skew", 7680, 1, 2, 1000, "bf16", None, (1, 16), True, 0.0),
    ("bf16-h2048-k6-e24-empty", 2048, 6, 24, 128, "bf16", "0M", (1, 128), False, 0.3),
    ("fp32-h2048-k2-e4", 2048, 2, 4, 64, "fp32", None, (1,), False, 0.2),
    ("bf16-h2048-k3-e8-t8192", 2048, 3, 8, 8192, "bf16", "M", (128,), False, 0.1),
    ("bf16-h4096-k7-e14-skew", 4096, 7, 14, 256, "bf16", None, (16,), True, 0.1),
    ("bf16-h2048-k8-e8-alldrop", 2048, 8, 8, 64, "bf16", None, (1,), False, 1.0),
    ("bf16-h4096-k5-e10", 4096, 5, 10, 200, "bf16", None, (1, 16), False, 0.2),
    ("bf16-h2052-k2-e4-odd", 2052, 2, 4, 300, "bf16", None, (1,), False, 0.2),  # 4104-byte rows
    # FP8 rows over 16 KiB with 528-byte scale packs: both pass the pipelined push's stage in chunks
    ("fp8-h16896-k2-e4-wide", 16896, 2, 4, 64, "fp8", None, (1,), False, 0.1),
    # x and scales contiguous but one element past a 16-byte boundary (no vector loads)
    ("fp8-h4096-k4-e16-misaligned", 4096, 4, 16, 300, "fp8", None, (1,), False, 0.1),
]


# dispatch's outputs, in order (for the messages of byte comparisons)
OUT_NAMES = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights", "tokens_per_expert",
             "handle")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous tensor whose data starts one element past an
    allocation's (16-byte aligned) start."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def _inputs(rank, world, H, K, E, M, dtype, tokens, skew, drop, seed):
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    if tokens is None:
        T = int(torch.randint(0, M + 1, (1,), generator=g))
    elif tokens == "M":
        T = M
    else:  # "0M": rank 0 sends nothing, the others are full
        T = 0 if rank == 0 else M
    if skew:  # everyone picks the same first experts (expert 0 for K = 1)
        idx = torch.arange(K, dtype=torch.int64).repeat(T, 1)
    else:
        idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    idx = torch.where(torch.rand(T, K, generator=g) < drop, -1, idx)
    if rank % 2 == 1:
        idx = idx.to(torch.int32)  # both index dtypes
    w = torch.rand(T, K, generator=g) - 0.25
    scales = None
    if dtype == "fp8":
        x = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn)
        scales = torch.rand(T, (H + 127) // 128, generator=g) + 0.5
    elif dtype == "bf16":
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    else:
        x = torch.randn(T, H, generator=g)
    return x, scales, idx, w


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a = a.cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if a.numel() == 0:
        return
    ab, bb = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    if not torch.equal(ab, bb):
        diff = (ab != bb).reshape(a.shape[0], -1).any(-1).nonzero().flatten()
        raise AssertionError(f"{what}: {diff.numel()} rows differ, first {diff[:8].tolist()}; "
                             f"got {a[diff[0]].flatten()[:12].tolist()} want "
                             f"{b[diff[0]].flatten()[:12].tolist()}")


def _ref_buf(buf, gloo):
    """The CPU reference's view of ``buf`` over the gloo group (the handles it builds carry
    ``buf``'s id, so they equal the CUDA ones byte for byte)."""
    return types.SimpleNamespace(group=gloo, world_size=buf.world_size, rank=buf.rank,
                                 num_max_tokens_per_rank=buf.num_max_tokens_per_rank,
                                 hidden=buf.hidden, num_topk=buf.num_topk,
                                 num_experts=buf.num_experts, group_name="ref", id=buf.id)


def _check_all(rank, world, gloo, seed, names=None):
    """Every case of CASES (those in ``names`` when given) against the reference."""
    import deep_ep_ops
    from deep_ep_ops.cpu import moe as ref
    from deep_ep_ops.trim import trim_dispatch
    dev = rank_device()
    import torch.distributed as dist
    group = dist.group.WORLD
    for (name, H, K, E, M, dtype, tokens, aligns, skew, drop) in CASES:
        if E % world or (names is not None and name not in names):
            continue
        if world > 2:  # more ranks: the same layouts at a size the CPU reference keeps up with
            M, aligns = min(M, 256), aligns[-1:]
        buf = deep_ep_ops.Buffer(group, num_max_tokens_per_rank=M, hidden=H, num_topk=K,
                                 num_experts=E, fp8_dispatch=dtype == "fp8", timeout_s=60.0)
        rbuf = _ref_buf(buf, gloo)
        x, s, idx, w = _inputs(rank, world, H, K, E, M, dtype, tokens, skew, drop, seed)
        gx, gs, gidx, gw = (t.to(dev) if t is not None else None for t in (x, s, idx, w))
        if name.endswith("-misaligned"):
            gx, gs = _misaligned(gx), _misaligned(gs)
            assert gx.data_ptr() % 16 and gs.data_ptr() % 16 and gx.is_contiguous()
        for A in aligns:
            for expand in (False, True):
                for exact in (False, True):
                    where = f"[{name} R={world} rank={rank} A={A} expand={expand} exact={exact}]"
                    outs = torch.ops.deep_ep.dispatch(gx, gs, gidx, gw, buf.group_name, E, A,
                                                      expand, exact)
                    want = ref.dispatch(rbuf, x, s, idx, w, E, A, expand)
                    if exact:
                        want = trim_dispatch(*want)
                    for got, exp, nm in zip(outs, want, OUT_NAMES):
                        _same(got, exp, f"{where} {nm}")
                    if not exact and A == aligns[0]:
                        # other grids (1 CTA: many tokens per CTA; 3: uneven tiles) give the
                        # same bytes
                        for ns in (1, 3):
                            again = torch.ops.deep_ep.dispatch(gx, gs, gidx, gw, buf.group_name,
                                                               E, A, expand, False, ns)
                            for got, exp, nm in zip(again, want, OUT_NAMES):
                                _same(got, exp, f"{where} num_sms={ns} {nm}")
                    handle, rhandle = outs[5], want[5]
                    C = outs[0].shape[0]

                    # cached dispatch of new rows reproduces the routing
                    x2 = (x.float() * 0.5 + 1).to(x.dtype)
                    s2 = s * 2 if s is not None else None
                    cx, cs = torch.ops.deep_ep.cached_dispatch(
                        x2.to(dev), s2.to(dev) if s2 is not None else None, handle,
                        buf.group_name)
                    rx, rs = ref.cached_dispatch(rbuf, x2, s2, rhandle)
                    _same(cx, rx, f"{where} cached recv_x")
                    _same(cs, rs, f"{where} cached recv_x_scales")

                    # combine: the received rows (as bf16/fp32) with the layout's weights
                    cin = outs[0] if dtype != "fp8" else outs[0].to(torch.bfloat16)
                    cw = outs[3] if expand else None
                    got = torch.ops.deep_ep.combine(cin, handle, cw, buf.group_name)
                    exp = ref.combine(rbuf, cin.cpu(), rhandle, cw.cpu() if cw is not None
                                      else None)
                    _same(got, exp, f"{where} combine")
                    # fp32, per-row weights, and the narrow [C, K] rows of the autograd formula
                    g = torch.Generator().manual_seed(seed + A)
                    f32 = torch.randn(C, H, generator=g)
                    rw = torch.rand(C, generator=g)
                    got = torch.ops.deep_ep.combine(f32.to(dev), handle, rw.to(dev),
                                                    buf.group_name)
                    _same(got, ref.combine(rbuf, f32, rhandle, rw), f"{where} combine fp32 w")
                    narrow = torch.randn(C, K, generator=g)
                    got = torch.ops.deep_ep.combine(narrow.to(dev), handle, None,
                                                    buf.group_name)
                    _same(got, ref.combine(rbuf, narrow, rhandle, None),
                          f"{where} combine fp32 [C,K]")
        torch.cuda.synchronize()
        bulk = os.environ.get("DEEP_EP_OPS_BULK_COPY") == "1"
        if world > 1 and (bulk or os.environ.get("DEEP_EP_OPS_PUSH_PIPELINE") != "0"):
            # + the num_sms 1, 3 reruns
            _check_push_loop(buf, name, x, s, len(aligns) * 2 + 2, "bulk" if bulk else "pipelined")
        print(f"rank {rank}: {name} ok", flush=True)
        buf.destroy()


def _check_push_loop(buf, name, x, s, compact_dispatches, loop):
    """The compact dispatches of a case whose rows and scale packs are 16-byte multiples at
    16-byte addresses took `loop` ("pipelined", the default, or "bulk" with
    DEEP_EP_OPS_BULK_COPY=1, which also needs the row within the device's bulk limit), the
    others the general register loop (so the bitwise checks above covered the path asked for)."""
    st = buf.ep_state.dispatch_push_stats
    x_bytes = x.shape[1] * x.element_size()
    s_bytes = s.shape[1] * s.element_size() if s is not None else 0
    takes = not name.endswith("-misaligned") and x_bytes % 16 == 0 and s_bytes % 16 == 0
    if loop == "bulk":
        takes = takes and x_bytes + s_bytes <= st["bulk_row_limit"]
    assert st[loop] == (compact_dispatches if takes else 0), (name, x_bytes, s_bytes, st)
    # the pipelined loop counts in the push itself when asked to (an experiment)
    fused = loop == "pipelined" and os.environ.get("DEEP_EP_OPS_DISPATCH_FUSED") == "1"
    assert st["fused"] == (st["pipelined"] if fused else 0), (name, st)
    # the unfused pipelined loop sends its last tokens in halves when asked to (rows under the
    # L2 hints, both halves 16-byte multiples)
    split = (not fused and os.environ.get("DEEP_EP_OPS_ROW_L2_EVICT") != "0"
             and int(os.environ.get("DEEP_EP_OPS_PUSH_SPLIT_TAIL", "0")) > 0
             and x_bytes % 32 == 0 and s_bytes % 32 == 0)
    assert st["split_tail"] == (st["pipelined"] if split else 0), (name, st)
    # the layout's count blocks write the routing rows of the unfused pipelined loop's
    # dispatches (those that build their bases from the blocks' words) when this rank has more
    # than one count block (a count CTA takes 32 tokens per warp, 8 warps at these E)
    warps = min(8, int(os.environ.get("DEEP_EP_OPS_LAYOUT_WARPS", "8")))
    by_count = (not fused and os.environ.get("DEEP_EP_OPS_ROUTING_BY_COUNT") != "0"
                and os.environ.get("DEEP_EP_OPS_BLOCK_WORDS") != "0" and x.shape[0] > 32 * warps)
    assert st["routing_by_count"] == (st["pipelined"] if by_count else 0), (name, st)


WORLDS = [1, 2, 3, 4, 8]  # more ranks than GPUs: several per GPU under MPS


@pytest.mark.parametrize("world", WORLDS)
def test_dispatch_combine_bitwise(world):
    run_on_gpus(_check_all, world, 1234)


# Above R = 2 the cases keep T <= 256, one count block of 8 warps: these run them with one warp
# per count CTA (32 tokens), so several count blocks, with their routing rows written by the
# blocks (block_routing.cuh), and a rank with T = 0 among the lower ranks, run at every R.
SMALL_BLOCK_CASES = ("bf16-h2048-k8-e256", "fp8-h4096-k4-e16", "bf16-h2048-k6-e24-empty")


def _check_small_count_blocks(rank, world, gloo, seed):
    os.environ["DEEP_EP_OPS_LAYOUT_WARPS"] = "1"  # read by this fresh process's first dispatch
    _check_all(rank, world, gloo, seed, names=SMALL_BLOCK_CASES)


@pytest.mark.parametrize("world", [3, 4, 8])
def test_dispatch_bitwise_small_count_blocks(world):
    run_on_gpus(_check_small_count_blocks, world, 4321)


def moe_step(buf, rank, A):
    """``(step, new_inputs)``: ``step(x, idx, w)`` = dispatch -> per-expert matmul -> combine
    on ``buf`` (bf16 rows, expert-major with alignment A), returning (out, tokens_per_expert);
    ``new_inputs(seed)`` = M tokens with new rows and routing (-1 entries too)."""
    dev = rank_device()
    M, H, K, E = buf.num_max_tokens_per_rank, buf.hidden, buf.num_topk, buf.num_experts
    E_loc = E // buf.world_size
    g = torch.Generator(device=dev).manual_seed(rank)
    weights = torch.randn(E_loc, H, H, device=dev, generator=g) / H ** 0.5

    def step(x, idx, w):
        rx, _, ridx, rw, tpe, handle = torch.ops.deep_ep.dispatch(
            x, None, idx, w, buf.group_name, E, A, True, False)
        y = torch.zeros_like(rx, dtype=torch.float32)
        for j in range(E_loc):
            y = y + (ridx == j).unsqueeze(1) * (rx.float() @ weights[j])
        return torch.ops.deep_ep.combine(y.to(torch.bfloat16), handle, rw, buf.group_name), tpe

    def new_inputs(seed):
        gg = torch.Generator(device=dev).manual_seed(seed * 10 + rank)
        x = torch.randn(M, H, device=dev, generator=gg).to(torch.bfloat16)
        idx = torch.rand(M, E, device=dev, generator=gg).topk(K, dim=1).indices
        idx = torch.where(torch.rand(M, K, device=dev, generator=gg) < 0.2, -1, idx)
        w = torch.rand(M, K, device=dev, generator=gg)
        return x, idx, w

    return step, new_inputs


def check_graph_replays(step, new_inputs, gloo, replays: int) -> None:
    """``step`` captured once in a CUDA graph, replayed ``replays`` times with new tokens and
    routing copied into its static inputs; every replay equals the eager run bitwise."""
    import torch.distributed as dist
    sx, sidx, sw = new_inputs(0)
    graph, (gout, gtpe) = capture_graph(lambda: step(sx, sidx, sw), warmup=2,
                                        before_capture=lambda: dist.barrier(group=gloo))
    for it in range(1, replays + 1):
        x, idx, w = new_inputs(it)
        sx.copy_(x)
        sidx.copy_(idx)
        sw.copy_(w)
        graph.replay()
        got, got_tpe = gout.clone(), gtpe.clone()
        want, want_tpe = step(x, idx, w)
        torch.cuda.synchronize()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"replay {it}"
        assert torch.equal(got_tpe, want_tpe), f"replay {it} tokens_per_expert"
    dist.barrier(group=gloo)
    del graph


def _graph_body(rank, world, gloo):
    """dispatch -> per-expert matmul -> combine, 100 graph replays with new routing."""
    import deep_ep_ops
    import torch.distributed as dist
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=128, hidden=256,
                             num_topk=4, num_experts=8 * world)
    step, new_inputs = moe_step(buf, rank, A=16)
    check_graph_replays(step, new_inputs, gloo, 100)
    buf.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_graph_replay(world):
    run_on_gpus(_graph_body, world)


def _timeout_body(rank, world, gloo):
    import os
    import sys
    import deep_ep_ops
    import torch.distributed as dist
    from deep_ep_ops.cuda import ep
    dev = rank_device()
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=16, hidden=128,
                             num_topk=2, num_experts=4, timeout_s=2.0)
    if rank == 0:
        x = torch.randn(16, 128, device=dev).to(torch.bfloat16)
        idx = torch.tensor([[0, 3]] * 16, device=dev)
        w = torch.ones(16, 2, device=dev)
        # the kernel gives up after timeout_s, reports, and the call completes ...
        torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, 4)
        torch.cuda.synchronize()
        print("rank 0: first call finished", flush=True)
        err = ep.last_error(buf.ep_state)
        print(f"rank 0: recorded {err}", flush=True)
        # ... and the next call on the Buffer raises, naming the stalled peer (every other
        # rank stalled; the record names the first wait that gave up)
        try:
            torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, 4)
            failed = None
        except RuntimeError as exc:
            failed = str(exc)
        ok = (err is not None and 1 <= err["peer"] < world and err["rank"] == 0 and
              failed is not None and f"peer rank {err['peer']}" in failed)
        print(f"rank 0 timeout report: {err}; next call: {failed}", flush=True)
    dist.barrier(group=gloo)  # the other ranks skipped the collective; all leave now
    sys.stdout.flush()
    if rank == 0 and not ok:
        raise AssertionError(f"expected a timeout naming a peer, got {err} / {failed}")
    os._exit(0)  # the Buffer's epochs are out of step: skip the collective teardown


@pytest.mark.parametrize("world", [2, 4])
def test_timeout_names_peer(world):
    run_on_gpus(_timeout_body, world, timeout_s=120)
