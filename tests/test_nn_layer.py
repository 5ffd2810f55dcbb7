"""ExpertParallelMoE with an nn.ModuleList of arbitrary experts, every expert computation
(grouped windows, masked, compact) against a dense single-rank reference, on one host and on
groups spanning simulated hosts; the layer and a swapped Hugging Face block under
torch.compile(fullgraph=True) equal eager, forward and backward; FP8 dispatch refuses CPU
clearly; the FP8 quantizer round-trips."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import deep_ep_ops
from deep_ep_ops.nn import ExpertParallelMoE, dequantize_fp8, quantize_fp8
from tests.dist_utils import run_ranks

E, K, M, HID = 6, 2, 7, 16


def _all_experts():
    torch.manual_seed(3)  # every rank builds the same E experts and keeps its shard
    return nn.ModuleList(nn.Sequential(nn.Linear(HID, 24), nn.GELU(), nn.Linear(24, HID))
                         for _ in range(E))


def _routing(rank: int, T: int):
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, HID, generator=gen)
    scores = torch.randn(T, E, generator=gen).softmax(-1)
    w, idx = scores.topk(K, dim=-1)
    if T > 0:
        idx[0, 1] = -1  # a dropped slot
    return x, idx, w


def _dense(experts, x, idx, w):
    out = torch.zeros_like(x)
    for k in range(K):
        for e in range(E):
            hit = (idx[:, k] == e).unsqueeze(-1)
            out = out + torch.where(hit, w[:, k:k + 1] * experts[e](x), torch.zeros_like(x))
    return out


def _module_list_body(rank: int, R: int, L: int | None = None) -> None:
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E,
                             ranks_per_host=L)
    E_loc = E // R
    # a rank with no tokens (R > 2)
    T = (3 + 2 * rank) % (M + 1) if rank < R - 1 else 0 if R > 2 else M
    x, idx, w = _routing(rank, T)
    reference = _all_experts()
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref_out = _dense(reference, x_ref, idx, w_ref)
    ref_out.square().sum().backward()
    ref_grads = [p.grad for p in reference.parameters()]
    for g in ref_grads:  # the experts see every rank's tokens
        dist.all_reduce(g)
    mine = slice(rank * E_loc * 4, (rank + 1) * E_loc * 4)  # 4 tensors per expert

    for layout, impl, exact, align in (("expert_major", "loop", False, 4),
                                       ("expert_major", "masked", False, 1),
                                       ("expert_major", "loop", True, 2),
                                       ("compact", "masked", False, 1),
                                       ("compact", "auto", True, 1)):
        where = f"rank {rank}/{R} {layout} {impl} exact={exact}"
        experts = nn.ModuleList(list(_all_experts())[rank * E_loc:(rank + 1) * E_loc])
        moe = ExpertParallelMoE(buf, layout=layout, exact=exact, expert_alignment=align,
                                experts=experts, expert_impl=impl)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = moe(xx, idx, ww)
        out.square().sum().backward()
        torch.testing.assert_close(out, ref_out.detach(), msg=where)
        torch.testing.assert_close(xx.grad, x_ref.grad, msg=where)
        torch.testing.assert_close(ww.grad, w_ref.grad, msg=where)
        for got, want in zip(moe.experts.parameters(), ref_grads[mine]):
            torch.testing.assert_close(got.grad, want, msg=where)
    buf.destroy()


@pytest.mark.parametrize("R", [2, 3])
def test_module_list_experts_match_dense(R: int) -> None:
    run_ranks(_module_list_body, R)


@pytest.mark.parametrize("R,L", [(2, 1), (6, 3)])
def test_module_list_experts_match_dense_across_hosts(R: int, L: int) -> None:
    """The same layer on a Buffer whose group spans R // L simulated hosts (the multi-host
    path: rail stage, then the intra-host stage): nothing in the layer changes."""
    run_ranks(_module_list_body, R, L)


def _step(model, x, *rest):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x, *rest)
    y.square().sum().backward()
    base = getattr(model, "_orig_mod", model)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in base.named_parameters()}


def _assert_same(got, ref, where):
    torch.testing.assert_close(got[0], ref[0], msg=where)
    torch.testing.assert_close(got[1], ref[1], msg=where)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], msg=f"{where} {name}")


def _compile_body(rank: int, R: int) -> None:
    from tests.test_nn_hf import tiny_model
    from deep_ep_ops.nn import shard_moe_blocks

    # a swapped Hugging Face block: its own router + the windowed expert-major path
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=2 * 5, hidden=32, num_topk=2,
                             num_experts=4)
    model = shard_moe_blocks(tiny_model("mixtral", 4, 2), buf, expert_alignment=4)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(rank))
    ref = _step(block, x)
    _assert_same(_step(torch.compile(block, fullgraph=True, backend="inductor"), x), ref,
                 f"rank {rank} HF block inductor")
    torch._dynamo.reset()
    buf.destroy()

    # ModuleList experts, compact layout
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E)
    E_loc = E // R
    moe = ExpertParallelMoE(buf, layout="compact", experts=nn.ModuleList(
        list(_all_experts())[rank * E_loc:(rank + 1) * E_loc]))
    x, idx, w = _routing(rank, M)
    ref = _step(moe, x, idx, w)
    _assert_same(_step(torch.compile(moe, fullgraph=True, backend="aot_eager"), x, idx, w),
                 ref, f"rank {rank} ModuleList compact aot_eager")
    torch._dynamo.reset()
    buf.destroy()


def test_layers_compile_fullgraph_match_eager() -> None:
    run_ranks(_compile_body, 2)


def test_fp8_dispatch_is_cuda_only(single_rank_group) -> None:
    with deep_ep_ops.Buffer(num_max_tokens_per_rank=4, hidden=128, num_topk=1, num_experts=2,
                            fp8_dispatch=True) as buf:
        with pytest.raises(ValueError, match="FP8 dispatch needs CUDA"):
            ExpertParallelMoE(buf, 32, fp8=True)


def test_fp8_quantize_round_trip() -> None:
    x = torch.randn(5, 256) * torch.tensor([1e-3, 10.0]).repeat_interleave(128)
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (5, 2)
    assert scales.dtype == torch.float32 and scales.is_contiguous()
    back = dequantize_fp8(q, scales, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 per element at the block's scale
    err = (back - x).abs().reshape(5, 2, 128).amax(-1)
    assert (err <= x.abs().reshape(5, 2, 128).amax(-1) / 16).all()
    with pytest.raises(ValueError, match="divisible by 128"):
        quantize_fp8(torch.randn(2, 100))


def _decode_step_body(rank: int, R: int) -> None:
    """The swapped model's decode step with a StaticCache traces as one graph (no host sync:
    what CUDA-graph capture needs) and equals the full forward's last-position logits."""
    import copy

    from tests.test_nn_hf import tiny_model, transformers
    from deep_ep_ops.nn import shard_moe_blocks
    batch, prompt_len = 2, 4
    ref = tiny_model("mixtral", 4, 2).eval()
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=batch * prompt_len, hidden=32,
                             num_topk=2, num_experts=4)
    model = shard_moe_blocks(copy.deepcopy(ref), buf)
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    ids = torch.randint(0, 64, (batch, prompt_len), generator=torch.Generator().manual_seed(rank))

    def step(tok, pos):
        return model(input_ids=tok, position_ids=pos.expand(batch, -1), cache_position=pos,
                     past_key_values=cache, use_cache=True).logits[:, -1]
    with torch.no_grad():
        step(ids, torch.arange(prompt_len))
        tok = ids[:, -1:].flip(0)
        got = torch.compile(step, fullgraph=True, backend="eager")(tok, torch.tensor([prompt_len]))
        want = ref(input_ids=torch.cat([ids, tok], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    buf.destroy()


def test_hf_decode_step_traces_without_host_sync() -> None:
    run_ranks(_decode_step_body, 2)
