"""An MoE layer under torch.compile(fullgraph=True, mode="reduce-overhead") on 1 and 2 GPUs matches
eager, forward and backward (static capacity: the compiled graph may be CUDA-graphed)."""
from __future__ import annotations

import pytest
import torch

from tests.gpu.dist_gpu import rank_device, run_on_gpus

E, K, M, HID, FFN = 8, 2, 64, 128, 64


def _body(rank: int, world: int, gloo, layout: str) -> None:
    import torch.distributed as dist
    from torch import nn

    import deep_ep_ops
    from deep_ep_ops.nn import ExpertParallelMoE, TopKRouter

    dev = rank_device()
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=M, hidden=HID,
                             num_topk=K, num_experts=E)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.router = TopKRouter(HID, E, K, device=dev)
            torch.manual_seed(10 + rank)
            self.moe = ExpertParallelMoE(buf, FFN, layout=layout, device=dev)

        def forward(self, x):
            idx, w = self.router(x)
            return x + self.moe(x, idx, w)

    model = Block()

    def run(fn, x):
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        y = fn(x)
        y.square().sum().backward()
        return y.detach().clone(), x.grad.clone(), {
            n: p.grad.clone() for n, p in model.named_parameters()}

    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for step in range(4):  # cudagraph trees record on a later call: compare every call
        gen = torch.Generator(device=dev).manual_seed(step)
        x = torch.randn(M - rank, HID, device=dev, generator=gen)
        want = run(model, x)
        got = run(compiled, x)
        where = f"rank {rank} {layout} step {step}"
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4, msg=where)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4, msg=where)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-4,
                                       msg=f"{where} {name}")
    from torch._dynamo.utils import counters
    skips = dict(counters["inductor"].get("cudagraph_skips", {}) or {})
    print(f"rank {rank} {layout}: compiled == eager over 4 steps; cudagraph skips: {skips}",
          flush=True)
    dist.barrier(group=gloo)
    buf.destroy()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("layout", ["expert_major", "compact"])
def test_compiled_reduce_overhead_matches_eager(layout: str, world: int) -> None:
    run_on_gpus(_body, world, layout)
