"""``Buffer(zero_copy_combine=True)``: a combine whose ``x`` is a ``buf.combine_input()`` slot
and has no weights lets the peers read its rows in place; the result equals the CPU reference
byte for byte, as the pushed path does, also when some ranks push and others are read in place,
for both layouts, bf16 / fp16 / fp32 rows and in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu.dist_gpu import capture_graph, gpus, rank_device, run_on_gpus
from tests.gpu.test_moe_ops_gpu import _inputs, _ref_buf, _same

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

# (name, H, K, E, M, tokens, drop)
CASES = [
    ("h2048-k8-e64", 2048, 8, 64, 256, None, 0.2),
    ("h2052-k2-e4-odd", 2052, 2, 4, 300, None, 0.2),
    ("h7168-k8-e256-full", 7168, 8, 256, 512, "M", 0.0),
]


def _body(rank, world, gloo):
    import deep_ep_ops
    import torch.distributed as dist
    from deep_ep_ops.cpu import moe as ref
    dev = rank_device()
    for name, H, K, E, M, tokens, drop in CASES:
        if E % world:
            continue
        buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=H,
                                 num_topk=K, num_experts=E, timeout_s=60.0,
                                 zero_copy_combine=True)
        rbuf = _ref_buf(buf, gloo)
        x, _, idx, w = _inputs(rank, world, H, K, E, M, "bf16", tokens, False, drop, 5)
        gx, gidx, gw = x.to(dev), idx.to(dev), w.to(dev)
        in_place = pushed = 0
        slots_seen = []
        for expand in (False, True):
            outs = torch.ops.deep_ep.dispatch(gx, None, gidx, gw, buf.group_name, E, 1, expand)
            rhandle = ref.dispatch(rbuf, x, None, idx, w, E, 1, expand)[5]
            handle, C = outs[5], outs[0].shape[0]
            g = torch.Generator().manual_seed(rank + 11)
            # expert-major outputs have more rows than a slot holds at width H: narrower rows
            width = H if not expand else 8
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                if C * width * dtype.itemsize > buf.ep_state.combine_input_stats["slot_bytes"]:
                    continue
                y = torch.randn(C, width, generator=g).to(dtype)
                want = ref.combine(rbuf, y, rhandle, None)
                for mixed in (False, True):
                    where = f"[{name} R={world} rank={rank} expand={expand} {dtype} mixed={mixed}]"
                    if mixed and rank % 2 == 1:  # this rank pushes, its peers are read in place
                        cin = y.to(dev)
                        pushed += 1
                    else:
                        cin = buf.combine_input(C, width, dtype)
                        cin.copy_(y)
                        in_place += 1
                        slots_seen.append(cin.data_ptr())
                    got = torch.ops.deep_ep.combine(cin, handle, None, buf.group_name)
                    _same(got, want, f"{where} combine")
                # with weights a rank always pushes
                rw = torch.rand(C, generator=g)
                cin = buf.combine_input(C, width, dtype)
                cin.copy_(y)
                slots_seen.append(cin.data_ptr())
                got = torch.ops.deep_ep.combine(cin, handle, rw.to(dev), buf.group_name)
                pushed += 1
                _same(got, ref.combine(rbuf, y, rhandle, rw), f"[{name} {dtype}] weighted")
        # the slots alternate
        assert all(a != b for a, b in zip(slots_seen, slots_seen[1:])), slots_seen
        assert len(set(slots_seen)) == 2, slots_seen
        st = buf.ep_state.combine_input_stats
        assert st["in_place"] == in_place and st["pushed"] == pushed, (st, in_place, pushed)
        print(f"rank {rank}: {name} ok ({st})", flush=True)

        # one CUDA graph: the expert output written into the slot, then combine
        outs = torch.ops.deep_ep.dispatch(gx, None, gidx, gw, buf.group_name, E)
        handle, C = outs[5], outs[0].shape[0]
        sy = torch.zeros(C, H, device=dev, dtype=torch.bfloat16)

        def step():
            cin = buf.combine_input(C)
            cin.copy_(sy)
            return torch.ops.deep_ep.combine(cin, handle, None, buf.group_name)

        # warm-up and capture each take a slot: the graph's slot is the capture's. Between
        # replays the eager combine's barrier keeps the next replay's write behind the peers'
        # reads (in a MoE step the dispatch before the experts does the same).
        graph, gout = capture_graph(step, warmup=1,
                                    before_capture=lambda: dist.barrier(group=gloo))
        for it in range(3):
            sy.copy_(torch.randn(C, H, generator=torch.Generator().manual_seed(it + 7 * rank))
                     .to(torch.bfloat16))
            graph.replay()
            got = gout.clone()
            torch.cuda.synchronize()
            want = torch.ops.deep_ep.combine(sy, handle, None, buf.group_name)  # pushed path
            torch.cuda.synchronize()
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"replay {it}"
        dist.barrier(group=gloo)
        del graph
        buf.destroy()

    # a Buffer without slots, and a request larger than a slot
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=8, hidden=64,
                             num_topk=2, num_experts=2 * world)
    with pytest.raises(ValueError, match=r"create it with zero_copy_combine=True"):
        buf.combine_input(4)
    buf.destroy()
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=8, hidden=64,
                             num_topk=2, num_experts=2 * world, zero_copy_combine=True)
    rows = buf.ep_state.combine_input_stats["slot_bytes"] // (64 * 2) + 1
    with pytest.raises(ValueError, match=r"a slot holds"):
        buf.combine_input(rows)
    buf.combine_input(4)  # never passed to combine: the next request is refused
    with pytest.raises(RuntimeError, match=r"pass the last combine_input\(\) tensor to combine "
                                           r"first"):
        buf.combine_input(4)
    buf.destroy()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_combine_input_bitwise(world):
    run_on_gpus(_body, world)
