"""``Buffer(direct_outputs=N)``: dispatch outputs that the peers write straight into (slots of
the receiver's window) equal the CPU reference byte for byte, like the staged ones; the slot
is taken only when free and the outputs fit, and never under graph capture. Compact outputs
bring their routing tensors and handle into the slot too (the peers write those rows as well,
and no epilogue runs): each of the five holds the slot.

Each configuration runs twice: every rank with free slots, and the odd ranks with both slots
held by live outputs (so one push writes some destinations directly and stages for others).
"""
from __future__ import annotations

import gc

import pytest
import torch

from tests.gpu.dist_gpu import capture_graph, gpus, rank_device, run_on_gpus
from tests.gpu.test_moe_ops_gpu import OUT_NAMES as NAMES
from tests.gpu.test_moe_ops_gpu import _inputs, _ref_buf, _same

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

# (name, H, K, E, M, dtype, tokens, skew, drop): fp8 rows + scales at full size, bf16 with
# -1 entries, rows of 4104 bytes, K = 1 (expert-major outputs then fit a slot too)
CASES = [
    ("fp8-h7168-k8-e256", 7168, 8, 256, 512, "fp8", "M", False, 0.0),
    ("bf16-h2048-k8-e64-drop", 2048, 8, 64, 256, "bf16", None, False, 0.2),
    ("bf16-h2052-k2-e4-odd", 2052, 2, 4, 300, "bf16", None, False, 0.2),
    ("bf16-h4096-k1-e8", 4096, 1, 8, 256, "bf16", None, False, 0.1),
]


def _check(rank, world, gloo, buf, case, seed, odd_ranks_hold):
    """Every layout and wire against the reference. ``odd_ranks_hold``: two dispatches first,
    whose outputs the odd ranks keep alive meanwhile (their slots are all taken)."""
    from deep_ep_ops.cpu import moe as ref
    from deep_ep_ops.trim import trim_dispatch
    name, H, K, E, M, dtype, tokens, skew, drop = case
    dev = rank_device()
    rbuf = _ref_buf(buf, gloo)
    x, s, idx, w = _inputs(rank, world, H, K, E, M, dtype, tokens, skew, drop, seed)
    gx, gs, gidx, gw = (t.to(dev) if t is not None else None for t in (x, s, idx, w))
    held = []
    if odd_ranks_hold:
        held = [torch.ops.deep_ep.dispatch(gx, gs, gidx, gw, buf.group_name, E)[:2]
                for _ in range(2)]
        if rank % 2 == 0:
            held = []
    for expand in (False, True):
        for exact in (False, True):
            where = f"[{name} R={world} rank={rank} slots={buf.direct_outputs} " \
                    f"expand={expand} exact={exact}]"
            outs = torch.ops.deep_ep.dispatch(gx, gs, gidx, gw, buf.group_name, E, 1, expand,
                                              exact)
            want = ref.dispatch(rbuf, x, s, idx, w, E, 1, expand)
            if exact:
                want = trim_dispatch(*want)
            for got, exp, nm in zip(outs, want, NAMES):
                _same(got, exp, f"{where} {nm}")
            # the handle of a direct dispatch drives combine like any other
            cin = outs[0] if dtype != "fp8" else outs[0].to(torch.bfloat16)
            cw = outs[3] if expand else None
            got = torch.ops.deep_ep.combine(cin, outs[5], cw, buf.group_name)
            exp = ref.combine(rbuf, cin.cpu(), want[5], cw.cpu() if cw is not None else None)
            _same(got, exp, f"{where} combine")
            del outs, cin, got
    del held  # the odd ranks' slots are free again


def _body(rank, world, gloo):
    import deep_ep_ops
    import torch.distributed as dist
    dev = rank_device()
    slots = 2
    for mixed in (False, True):
        for case in CASES:
            name, H, K, E, M, dtype = case[:6]
            if E % world:
                continue
            buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H,
                                     num_topk=K, num_experts=E, fp8_dispatch=dtype == "fp8",
                                     timeout_s=60.0, direct_outputs=slots)
            state = buf.ep_state
            _check(rank, world, gloo, buf, case, 17, mixed)
            torch.cuda.synchronize()
            gc.collect()
            st = state.direct_output_stats
            routed = state.dispatch_push_stats["direct_routing"]
            assert st["slots"] == slots and st["busy"] == 0, st
            held = 2 if mixed else 0  # the two holding dispatches (compact: direct)
            if mixed and rank % 2 == 1:
                assert st["direct"] == held and st["staged"] == 4, st
                assert routed == held, (routed, st)
            else:
                # compact always fits; expert-major only where its rows do: one row per
                # token at each rank (K = 1, or one local expert)
                want_direct = 4 if min(K, E // world) == 1 else 2
                assert st["direct"] == held + want_direct and st["staged"] == 4 - want_direct, st
                # the compact ones (not exact, exact) with their routing in the slot
                assert routed == held + 2, (routed, st)
            print(f"rank {rank}: {name} slots={slots} ok ({st})", flush=True)
            buf.destroy()

    # Every slot held by live outputs: the next dispatch stages, same bytes; dropping the
    # outputs frees the slots.
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=64, hidden=512,
                             num_topk=4, num_experts=4 * world, direct_outputs=2)
    x = torch.randn(64, 512, device=dev).to(torch.bfloat16)
    idx = torch.rand(64, 4 * world, device=dev).topk(4, dim=1).indices
    w = torch.rand(64, 4, device=dev)

    def run():
        return torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, 4 * world)

    first = run()
    held = [run()[0] for _ in range(1)]  # both slots taken now (first's and this one)
    st = buf.ep_state.direct_output_stats
    assert st["busy"] == 2 and st["direct"] == 2 and st["staged"] == 0, st
    third = run()
    st = buf.ep_state.direct_output_stats
    assert st["direct"] == 2 and st["staged"] == 1, st
    for got, exp, nm in zip(third, first, NAMES):
        _same(got, exp.cpu(), f"[held slots R={world} rank={rank}] {nm}")
    del first, held, third, got, exp  # (the loop's last pair: the handles, which hold slots)
    gc.collect()
    assert buf.ep_state.direct_output_stats["busy"] == 0
    # recv_x kept alive alone still holds its slot (the other outputs in it were dropped), and
    # so does the handle alone; both in this rank's window, the handle right before the
    # routing tensors
    window = range(buf.ep_state.window_base, buf.ep_state.window_base + buf.ep_state.window_bytes)
    for keep_at in (0, 5):
        outs = run()
        # (recv_x_scales: [C, 0] without scales, no address)
        assert all(outs[i].data_ptr() in window for i in (0, 2, 3, 5)), "outputs off the slot"
        assert outs[4].data_ptr() not in window  # tokens_per_expert: fresh
        end = outs[5].data_ptr() + outs[5].numel() * 4
        assert end == outs[2].data_ptr(), (end, outs[2].data_ptr())
        keep = outs[keep_at]
        del outs
        gc.collect()
        assert buf.ep_state.direct_output_stats["busy"] == 1, keep_at
        del keep
        gc.collect()
        assert buf.ep_state.direct_output_stats["busy"] == 0

    # Under capture the graph owns its outputs: the captured dispatch stages (its warm-up,
    # eager, takes a slot); replays equal eager runs.
    E = 4 * world

    def step(xs, ids, ws):
        rx, _, _, _, _, handle = torch.ops.deep_ep.dispatch(xs, None, ids, ws, buf.group_name, E)
        return torch.ops.deep_ep.combine((rx.float() * 1.5).to(torch.bfloat16), handle, None,
                                         buf.group_name)

    def new_inputs(seed):
        g = torch.Generator(device=dev).manual_seed(seed * 10 + rank)
        nidx = torch.rand(64, E, device=dev, generator=g).topk(4, dim=1).indices
        nidx = torch.where(torch.rand(64, 4, device=dev, generator=g) < 0.2, -1, nidx)
        return (torch.randn(64, 512, device=dev, generator=g).to(torch.bfloat16), nidx,
                torch.rand(64, 4, device=dev, generator=g))

    before = dict(buf.ep_state.direct_output_stats)
    sx, sidx, sw = new_inputs(0)
    graph, gout = capture_graph(lambda: step(sx, sidx, sw), warmup=1,
                                before_capture=lambda: dist.barrier(group=gloo))
    after = buf.ep_state.direct_output_stats
    assert after["staged"] == before["staged"] + 1, (before, after)
    assert after["direct"] == before["direct"] + 1, (before, after)
    for it in range(1, 6):
        nx, nidx, nw = new_inputs(it)
        sx.copy_(nx)
        sidx.copy_(nidx)
        sw.copy_(nw)
        graph.replay()
        got = gout.clone()
        want = step(nx, nidx, nw)
        torch.cuda.synchronize()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"replay {it}"
    dist.barrier(group=gloo)
    del graph
    buf.destroy()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_direct_outputs_bitwise(world):
    run_on_gpus(_body, world)
