"""CUDA pp_send_recv, cp_all_gather, cp_reduce_scatter and engram_fetch (+ backward) against the
CPU reference (deep_ep_ops.cpu.pp_cp / .engram over a gloo group on CPU copies of the same inputs),
on 1 and 2 GPUs: byte equality for moves, bitwise equality for the sums (the CUDA kernels add in
the reference's order, in fp32), both paths (one small kernel / copy engine), several in-flight
messages, CUDA-graph capture + replay with new data, torch.compile(fullgraph=True), autograd
(the Engram table trained through its scatter-add backward) and GPU-side timeouts.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from tests.gpu.dist_gpu import capture_graph, gpus, rank_device, run_on_gpus

pytestmark = pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")

MiB = 1 << 20


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a = a.detach().cpu()
    b = b.detach().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if a.numel() == 0:
        return
    ab = a.contiguous().reshape(-1).view(torch.uint8)
    bb = b.contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(ab, bb):
        bad = (ab != bb).nonzero().flatten()
        raise AssertionError(f"{what}: {bad.numel()} bytes differ, first at byte {int(bad[0])} "
                             f"of {ab.numel()}")


def _ref(rank, world, gloo):
    return types.SimpleNamespace(group=gloo, world_size=world, rank=rank, group_name="ref")


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype in (torch.int32, torch.int64):
        return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=dtype)
    x = torch.randn(shape, generator=g) * 3
    return x.to(dtype)


def _buffer(**kw):
    import deep_ep_ops
    # cp_reduce_scatter's input is R times the largest CP_CASES block (16 MiB)
    args = dict(num_max_tokens_per_rank=64, hidden=128, num_topk=1,
                num_experts=dist.get_world_size(), timeout_s=60.0, pp_max_bytes=64 * MiB,
                cp_max_bytes=(16 * dist.get_world_size() + 64) * MiB)
    args.update(kw)
    return deep_ep_ops.Buffer(**args)


# ---- pp_send_recv ---------------------------------------------------------------------------------

PP_CASES = [  # (shape, dtype): 12 B, 4 KiB, odd bf16, exactly the inline limit, one byte over,
    ((3,), torch.float32),      # a 20 MiB bulk message (2 chunks), a 48 MiB one (4 chunks), fp8
    ((1024,), torch.float32),
    ((1001, 3), torch.bfloat16),
    ((32 * 1024,), torch.bfloat16),
    ((64 * 1024 + 1,), torch.uint8),
    ((5 * MiB,), torch.float32),
    ((3 * MiB, 4), torch.float32),
    ((513, 7168), torch.float8_e4m3fn),
    ((2, 3, 5), torch.int64),
]


def _pp_body(rank, world, gloo):
    from deep_ep_ops.cpu import pp_cp as ref
    ops = torch.ops.deep_ep
    dev = rank_device()
    buf = _buffer()
    rb = _ref(rank, world, gloo)
    name = buf.group_name
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    # ring exchange, every size
    for i, (shape, dtype) in enumerate(PP_CASES):
        x = _rand(shape, dtype if dtype != torch.float8_e4m3fn else torch.float32, 100 * i + rank)
        x = x.to(dtype)
        got = ops.pp_send_recv(x.to(dev), nxt, prv, list(shape), dtype, name)
        want = ref.pp_send_recv(rb, x, nxt, prv, list(shape), dtype)
        _same(got, want, f"pp ring {shape} {dtype} R={world}")
    if world >= 2:
        # several messages in flight one way (rank 0 -> 1), inline and bulk mixed, FIFO; the
        # receiver starts after the sender enqueued all (the sender does not sync)
        shapes = [(7,), (4096,), (9 * MiB // 4,), (100,), (33, 33), (1,)]
        msgs = [_rand(s, torch.float32, 7000 + j) for j, s in enumerate(shapes)]
        if rank == 0:
            for m in msgs:
                out = ops.pp_send_recv(m.to(dev), 1, -1, [0], torch.float32, name)
                assert out.shape == (0,)
            dist.barrier(group=gloo)
        elif rank == 1:
            dist.barrier(group=gloo)
            for j, m in enumerate(msgs):
                got = ops.pp_send_recv(torch.empty(0, device=dev), -1, 0, list(m.shape),
                                       torch.float32, name)
                _same(got, m, f"pp in-flight message {j}")
        else:
            dist.barrier(group=gloo)
        # send one way and receive from the other in the same call (any peer pair)
        for shape in ((5,), (6 * MiB,)):
            x = _rand(shape, torch.bfloat16, 31 + rank)
            dst, src = (rank - 1) % world, (rank + 1) % world
            got = ops.pp_send_recv(x.to(dev), dst, src, list(shape), torch.bfloat16, name)
            want = ref.pp_send_recv(rb, x, dst, src, list(shape), torch.bfloat16)
            _same(got, want, f"pp reverse ring {shape}")
    # autograd: d send = pp of d recv back along the reversed edge
    x = _rand((64, 32), torch.float32, 5 + rank)
    w = _rand((64, 32), torch.float32, 50 + rank)
    xg = x.to(dev).requires_grad_()
    (ops.pp_send_recv(xg, nxt, prv, [64, 32], torch.float32, name) * w.to(dev)).sum().backward()
    want_grad = ref.pp_send_recv(rb, w, prv, nxt, [64, 32], torch.float32)  # grad flows back
    _same(xg.grad, want_grad, "pp backward")
    # CUDA graph: both paths, replayed with new data
    for shape in ((1024,), (5 * MiB,)):
        static = torch.zeros(shape, device=dev)
        graph, out = capture_graph(
            lambda: ops.pp_send_recv(static, nxt, prv, list(shape), torch.float32, name))
        for it in range(4):
            x = _rand(shape, torch.float32, 900 + 10 * it + rank)
            static.copy_(x)
            graph.replay()
            want = ref.pp_send_recv(rb, x, nxt, prv, list(shape), torch.float32)
            _same(out, want, f"pp graph replay {it} {shape}")
    torch.cuda.synchronize()
    buf.destroy()


# ---- cp_all_gather / cp_reduce_scatter -------------------------------------------------------------

CP_CASES = [  # rows per rank, trailing shape, dtype (rows divisible by R for reduce-scatter)
    (2, (1024,), torch.float32),        # 8 KiB per rank: inline
    (3, (7,), torch.float32),           # odd, tiny
    (2, (1000, 3), torch.bfloat16),     # inline, odd width
    (4, (8192,), torch.bfloat16),       # 64 KiB: inline limit
    (6, (8193,), torch.float16),        # just over: copy engine
    (8, (MiB // 2,), torch.float32),    # 16 MiB per rank
    (2, (3 * MiB,), torch.bfloat16),    # 12 MiB
    (4, (4096,), torch.float64),
    (4, (999,), torch.int64),
]


def _cp_body(rank, world, gloo):
    from deep_ep_ops.cpu import pp_cp as ref
    ops = torch.ops.deep_ep
    dev = rank_device()
    buf = _buffer()
    rb = _ref(rank, world, gloo)
    name = buf.group_name
    for i, (rows, tail, dtype) in enumerate(CP_CASES):
        x = _rand((rows, *tail), dtype, 300 + 7 * i + rank)
        _same(ops.cp_all_gather(x.to(dev), name), ref.cp_all_gather(rb, x),
              f"all_gather {rows}x{tail} {dtype} R={world}")
        xr = _rand((rows * world, *tail), dtype, 500 + 7 * i + rank)
        _same(ops.cp_reduce_scatter(xr.to(dev), name), ref.cp_reduce_scatter(rb, xr),
              f"reduce_scatter {rows * world}x{tail} {dtype} R={world}")
    # in place: the input already sits in this rank's all-gather slot
    for shape in ((4, 1 << 20), (3, 5)):
        x = _rand(shape, torch.float32, 77 + rank)
        slot = buf.cp_input(shape, torch.float32)
        slot.copy_(x)
        _same(ops.cp_all_gather(slot, name), ref.cp_all_gather(rb, x), f"all_gather in place {shape}")
    # non-contiguous input
    x = _rand((16, 64), torch.float32, 88 + rank)
    _same(ops.cp_all_gather(x.to(dev).t(), name), ref.cp_all_gather(rb, x.t().contiguous()),
          "all_gather non-contiguous")
    # autograd: the two are each other's backward
    x = _rand((4 * world, 64), torch.float32, 11 + rank)
    w = _rand((4 * world * world, 64), torch.float32, 12 + rank)
    xg = x.to(dev).requires_grad_()
    (ops.cp_all_gather(xg, name) * w.to(dev)).sum().backward()
    _same(xg.grad, ref.cp_reduce_scatter(rb, w), "all_gather backward")
    w2 = _rand((4, 64), torch.float32, 13 + rank)
    xg = x.to(dev).requires_grad_()
    (ops.cp_reduce_scatter(xg, name) * w2.to(dev)).sum().backward()
    _same(xg.grad, ref.cp_all_gather(rb, w2), "reduce_scatter backward")
    # CUDA graph: both ops, both paths, replays with new data
    for rows, cols in ((2, 512), (4, MiB)):
        sa = torch.zeros(rows, cols, device=dev)
        sr = torch.zeros(rows * world, cols, device=dev)
        graph, (oa, orr) = capture_graph(
            lambda: (ops.cp_all_gather(sa, name), ops.cp_reduce_scatter(sr, name)))
        for it in range(4):
            xa = _rand((rows, cols), torch.float32, 1000 + it * 10 + rank)
            xr = _rand((rows * world, cols), torch.float32, 2000 + it * 10 + rank)
            sa.copy_(xa)
            sr.copy_(xr)
            graph.replay()
            _same(oa, ref.cp_all_gather(rb, xa), f"all_gather graph replay {it} {cols}")
            _same(orr, ref.cp_reduce_scatter(rb, xr), f"reduce_scatter graph replay {it} {cols}")
    torch.cuda.synchronize()
    buf.destroy()


# ---- engram ------------------------------------------------------------------------------------------

ENGRAM_CASES = [  # entries per rank, hidden, dtype, N, L, index dtype
    (1000, 128, torch.bfloat16, 37, 5, torch.int64),
    (50, 128, torch.bfloat16, 61, 3, torch.int32),   # many duplicate rows (backward order)
    (300, 33, torch.float32, 20, 4, torch.int64),    # 132-byte rows: the unaligned path
    (200, 256, torch.float8_e4m3fn, 16, 24, torch.int32),
    (64, 64, torch.float16, 0, 3, torch.int64),      # no tokens on every rank
]


def _engram_indices(N, L, limit, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, limit, (N, L), generator=g)
    idx = torch.where(torch.rand(N, L, generator=g) < 0.15, -1, idx)
    return idx.to(dtype)


def _engram_body(rank, world, gloo):
    from deep_ep_ops.cpu import engram as ref
    ops = torch.ops.deep_ep
    dev = rank_device()
    rb = _ref(rank, world, gloo)
    for ci, (n, H, dtype, N, L, idt) in enumerate(ENGRAM_CASES):
        buf = _buffer()
        name = buf.group_name
        table = buf.engram_table(n, H, dtype, max_fetch_rows=4096)
        assert table.shape == (n, H) and table.dtype == dtype and table.is_cuda
        assert int(table.view(torch.uint8).ne(0).sum()) == 0, "a fresh table reads as zeros"
        vals = _rand((n, H), torch.float32, 40 + 100 * ci + rank).to(dtype)
        table.copy_(vals.to(dev))
        for it in range(3):
            idx = _engram_indices(N, L, world * n, idt, 60 + 100 * ci + 10 * it + rank)
            got = ops.engram_fetch(table, idx.to(dev), name)
            _same(got, ref.engram_fetch(rb, vals, idx), f"engram fetch case {ci} it {it}")
        if dtype in (torch.bfloat16, torch.float32, torch.float16):
            # backward: owners sum every rank's row gradients in (rank, position) order
            idx = _engram_indices(N, L, world * n, idt, 70 + 100 * ci + rank)
            g = _rand((N, L * H), torch.float32, 80 + 100 * ci + rank).to(dtype)
            param = table.requires_grad_()
            out = ops.engram_fetch(param, idx.to(dev), name)
            out.backward(g.to(dev))
            want = ref.engram_scatter_add(rb, g, idx, n, H)
            _same(param.grad, want, f"engram backward case {ci}")
            # an SGD step on the table, then a fetch sees the new rows everywhere
            with torch.no_grad():
                param -= 0.5 * param.grad
            vals = (vals.float() - 0.5 * want.float()).to(dtype)
            _same(table, vals, "engram table after SGD step")
            idx = _engram_indices(N, L, world * n, idt, 90 + 100 * ci + rank)
            _same(ops.engram_fetch(table, idx.to(dev), name), ref.engram_fetch(rb, vals, idx),
                  f"engram fetch after SGD case {ci}")
            param.grad = None
            param.requires_grad_(False)
        torch.cuda.synchronize()
        buf.destroy()

    # CUDA graph: fetch with new indices and table rows changed between replays
    buf = _buffer()
    name = buf.group_name
    n, H = 500, 128
    table = buf.engram_table(n, H, torch.bfloat16)
    static_idx = torch.zeros(64, 24, dtype=torch.int64, device=dev)
    graph, out = capture_graph(lambda: ops.engram_fetch(table, static_idx, name))
    for it in range(4):
        vals = _rand((n, H), torch.float32, 3000 + 10 * it + rank).to(torch.bfloat16)
        idx = _engram_indices(64, 24, world * n, torch.int64, 4000 + 10 * it + rank)
        table.copy_(vals.to(dev))
        static_idx.copy_(idx.to(dev))
        graph.replay()
        _same(out, ref.engram_fetch(rb, vals, idx), f"engram graph replay {it}")
    # out-of-range index: the row is zero and the next call raises (then the Buffer goes on)
    bad = torch.tensor([[0, world * n]], device=dev)
    got = ops.engram_fetch(table, bad, name)
    torch.cuda.synchronize()
    assert int(got[0, H:].float().abs().sum()) == 0
    with pytest.raises(ValueError, match="outside"):
        ops.engram_fetch(table, bad[:, :1], name)
    ops.engram_fetch(table, bad[:, :1], name)
    torch.cuda.synchronize()
    buf.destroy()


# ---- torch.compile --------------------------------------------------------------------------------

def _compile_body(rank, world, gloo):
    ops = torch.ops.deep_ep
    dev = rank_device()
    buf = _buffer()
    name = buf.group_name
    table = buf.engram_table(100, 64, torch.float32)
    table.copy_(_rand((100, 64), torch.float32, 5 + rank).to(dev))
    nxt, prv = (rank + 1) % world, (rank - 1) % world

    # The outputs compared are the ops' own (exact); a sum over them would differ in rounding
    # between eager and Inductor's reduction order, not because of the ops.
    def step(x, idx):
        y = ops.cp_all_gather(x * 2, name)
        z = ops.cp_reduce_scatter(y + 1, name)
        w = ops.pp_send_recv(z, nxt, prv, list(z.shape), z.dtype, name)
        e = ops.engram_fetch(table, idx, name)
        return w, e, y

    x = _rand((4, 256), torch.float32, 9 + rank).to(dev)
    idx = _engram_indices(8, 3, world * 100, torch.int64, 19 + rank).to(dev)
    eager = step(x, idx)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        got = compiled(x, idx)
        for a, b in zip(got, eager):
            _same(a, b, "compiled vs eager")
    torch.cuda.synchronize()
    buf.destroy()


# ---- timeout ----------------------------------------------------------------------------------------

def _timeout_body(rank, world, gloo):
    from deep_ep_ops.cuda import channels
    ops = torch.ops.deep_ep
    dev = rank_device()
    buf = _buffer(timeout_s=2.0, pp_slots=2)
    name = buf.group_name
    if rank == 0:  # rank 1 never receives: the third inline send waits for a slot, times out
        for _ in range(3):
            ops.pp_send_recv(torch.ones(8, device=dev), 1, -1, [0], torch.float32, name)
        torch.cuda.synchronize()
        err = channels.last_error(buf.channel_state)
        assert err is not None and err["peer"] == 1, err
        with pytest.raises(RuntimeError, match="peer rank 1"):
            ops.pp_send_recv(torch.ones(8, device=dev), 1, -1, [0], torch.float32, name)
    dist.barrier(group=gloo)
    buf.destroy()


WORLDS = [1, 2, 3, 4, 8]  # more ranks than GPUs: several per GPU under MPS


@pytest.mark.parametrize("world", WORLDS)
def test_pp_send_recv(world):
    run_on_gpus(_pp_body, world)


@pytest.mark.parametrize("world", WORLDS)
def test_cp_collectives(world):
    run_on_gpus(_cp_body, world)


@pytest.mark.parametrize("world", WORLDS)
def test_engram(world):
    run_on_gpus(_engram_body, world)


@pytest.mark.parametrize("world", [2, 4])
def test_compile_fullgraph(world):
    run_on_gpus(_compile_body, world)


@pytest.mark.parametrize("world", [2, 4])
def test_timeout_names_peer(world):
    run_on_gpus(_timeout_body, world)
