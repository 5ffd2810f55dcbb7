"""Hugging Face MoE models (Mixtral, Qwen3-MoE; tiny configs, random init) with their MoE
blocks swapped for the expert-parallel module give the unsharded model's logits, gradients
and post-step parameters, on 2 and 3 gloo ranks.

Every rank feeds its own batch; the reference is the unsharded model on the concatenated
batch with the loss summed, so replicated gradients summed over ranks equal the reference's
and each rank's expert gradients equal the reference's rows of its shard."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_ranks

transformers = pytest.importorskip("transformers")

B, S, V, HID = 2, 5, 64, 32
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_model(kind: str, num_experts: int, top_k: int, norm_topk_prob: bool = True):
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            vocab_size=V, hidden_size=HID, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
            num_experts_per_tok=top_k, max_position_embeddings=64, tie_word_embeddings=False)
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(
            vocab_size=V, hidden_size=HID, intermediate_size=64, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
            tie_word_embeddings=False)
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(config).float()


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return logits, loss


def _reference_slice(model, name, ref_tensor):
    """The reference rows matching ``name`` on this rank (the expert shard, or all)."""
    from deep_ep_ops.nn import HFExpertParallelBlock, is_expert_parameter
    param = model.get_parameter(name)
    if not is_expert_parameter(param):
        return ref_tensor
    block = model.get_submodule(name.split(".experts.")[0])
    assert isinstance(block, HFExpertParallelBlock)
    lo, hi = block.expert_range
    return ref_tensor[lo:hi]


def _hf_body(rank: int, R: int, cases) -> None:
    import deep_ep_ops
    from deep_ep_ops.nn import allreduce_replicated_grads, shard_moe_blocks

    for kind, E, K, norm, moe_kwargs in cases:
        where = f"rank {rank}/{R} {kind} E={E} K={K} {moe_kwargs}"
        ref = tiny_model(kind, E, K, norm)
        assert ref.model.layers[0].mlp.gate.weight.abs().sum() > 0
        model = copy.deepcopy(ref)
        buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=B * S, hidden=HID, num_topk=K,
                                 num_experts=E)
        shard_moe_blocks(model, buf, **moe_kwargs)
        assert sum(type(m).__name__ == "HFExpertParallelBlock" for m in model.modules()) == 2

        ids = torch.randint(0, V, (R * B, S), generator=torch.Generator().manual_seed(7))
        ref_logits, ref_loss = _loss(ref, ids)
        logits, loss = _loss(model, ids[rank * B:(rank + 1) * B])
        torch.testing.assert_close(logits, ref_logits[rank * B:(rank + 1) * B], **TOL,
                                   msg=lambda m: f"{where} logits: {m}")

        ref_loss.backward()
        loss.backward()
        allreduce_replicated_grads(model)
        names = [n for n, _ in model.named_parameters()]
        assert any(".experts." in n for n in names) and any(".gate." in n for n in names)
        for name, p in model.named_parameters():
            want = _reference_slice(model, name, ref.get_parameter(name).grad)
            torch.testing.assert_close(p.grad, want, **TOL,
                                       msg=lambda m: f"{where} grad {name}: {m}")

        for m in (ref, model):
            torch.optim.SGD(m.parameters(), lr=0.5).step()
        for name, p in model.named_parameters():
            want = _reference_slice(model, name, ref.get_parameter(name).detach())
            torch.testing.assert_close(p.detach(), want, **TOL,
                                       msg=lambda m: f"{where} param {name}: {m}")
        buf.destroy()


def test_hf_models_two_ranks() -> None:
    run_ranks(_hf_body, 2, [
        ("mixtral", 8, 2, True, dict(layout="expert_major", expert_alignment=4)),
        ("qwen3", 8, 3, False, dict(layout="compact")),
        ("qwen3", 4, 2, True, dict(layout="expert_major", expert_impl="masked")),
    ])


def test_hf_models_three_ranks() -> None:
    run_ranks(_hf_body, 3, [
        ("qwen3", 6, 3, True, dict(layout="expert_major")),
        ("mixtral", 6, 2, True, dict(layout="compact", exact=True)),
    ])


def test_shard_moe_blocks_rejects_mismatched_buffer(single_rank_group) -> None:
    import deep_ep_ops
    from deep_ep_ops.nn import shard_moe_blocks
    model = tiny_model("mixtral", 4, 2)
    with deep_ep_ops.Buffer(num_max_tokens_per_rank=8, hidden=HID, num_topk=2,
                            num_experts=8) as buf:
        with pytest.raises(ValueError, match="num_experts=4"):
            shard_moe_blocks(model, buf)
    with deep_ep_ops.Buffer(num_max_tokens_per_rank=8, hidden=HID, num_topk=2,
                            num_experts=4) as buf:
        with pytest.raises(ValueError, match="no .*SparseMoeBlock"):
            shard_moe_blocks(torch.nn.Linear(2, 2), buf)
