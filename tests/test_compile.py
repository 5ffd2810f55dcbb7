"""An MoE layer (router -> dispatch -> experts -> combine) under torch.compile(fullgraph=True)
matches eager forward and backward; torch.export of the static-capacity layer runs; unused
comm ops are not dead-code eliminated."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deep_ep_ops
from deep_ep_ops.nn import ExpertParallelMoE, TopKRouter
from tests.dist_utils import run_ranks

E, K, M, HID, FFN = 6, 2, 8, 16, 8


class Block(nn.Module):
    def __init__(self, buf, layout: str, exact: bool) -> None:
        super().__init__()
        torch.manual_seed(0)  # the router is replicated: same weights on every rank
        self.router = TopKRouter(HID, E, K)
        torch.manual_seed(100 + buf.rank)  # experts are sharded: each rank its own
        self.moe = ExpertParallelMoE(buf, FFN, layout=layout, exact=exact, expert_alignment=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.router(x)
        return x + self.moe(x, idx, w)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    (y.square().sum()).backward()
    base = getattr(model, "_orig_mod", model)  # compiled modules wrap the original
    grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    return y.detach(), x.grad.clone(), grads


def _compile_body(rank: int, R: int, backend: str) -> None:
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E)
    x = torch.randn(5 + rank, HID, generator=torch.Generator().manual_seed(rank))
    for layout, exact in (("expert_major", False), ("compact", False), ("expert_major", True)):
        model = Block(buf, layout, exact)
        ref = _run(model, x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        got = _run(compiled, x)
        where = f"rank {rank} {layout} exact={exact}"
        torch.testing.assert_close(got[0], ref[0], msg=where)
        torch.testing.assert_close(got[1], ref[1], msg=where)
        for name in ref[2]:
            torch.testing.assert_close(got[2][name], ref[2][name], msg=f"{where} {name}")
        torch._dynamo.reset()
    buf.destroy()


def _export_body(rank: int, R: int) -> None:
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E)
    model = Block(buf, "expert_major", exact=False).eval()
    x = torch.randn(6, HID, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref = model(x)
        program = torch.export.export(model, (x,))
        targets = {str(n.target) for n in program.graph.nodes}
        assert "deep_ep.dispatch.default" in targets and "deep_ep.combine.default" in targets
        got = program.module()(x)
    torch.testing.assert_close(got, ref)
    buf.destroy()


def _dce_body(rank: int, R: int) -> None:
    """Each rank sends to the next one and never uses what it receives: the compiled graph
    must still run the op on every rank (else a peer would wait forever)."""
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E)
    calls = []
    original = deep_ep_ops.ops.cpu_pp_cp.pp_send_recv

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    deep_ep_ops.ops.cpu_pp_cp.pp_send_recv = counting

    def step(t):
        torch.ops.deep_ep.pp_send_recv(t, (rank + 1) % R, (rank - 1) % R, [3], torch.float32,
                                       buf.group_name)
        torch.ops.deep_ep.cp_all_gather(t, buf.group_name)  # unused as well
        return t * 2
    out = torch.compile(step, fullgraph=True, backend="inductor")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert len(calls) == 1, f"pp_send_recv ran {len(calls)} times in the compiled step"
    deep_ep_ops.ops.cpu_pp_cp.pp_send_recv = original
    buf.destroy()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_moe_layer_matches_eager(backend: str) -> None:
    run_ranks(_compile_body, 2, backend)


def test_export_static_moe_layer() -> None:
    run_ranks(_export_body, 2)


def test_unused_comm_ops_are_kept() -> None:
    run_ranks(_dce_body, 2)
