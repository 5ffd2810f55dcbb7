"""Run Hugging Face ``transformers`` MoE models expert-parallel.

``shard_moe_blocks(model, buffer)`` swaps every ``MixtralSparseMoeBlock`` /
``Qwen3MoeSparseMoeBlock`` for an ``HFExpertParallelBlock``: the model's own router (``gate``,
the same module) and routing math, this rank's experts ``[r*E/R, (r+1)*E/R)``, and
dispatch -> experts -> combine in between. Parameter names stay the model's
(``...mlp.gate.weight``, ``...mlp.experts.gate_up_proj``), expert tensors holding this rank's
shard. Replicated (non-expert) parameters see only this rank's tokens: sum their gradients
over the group with ``allreduce_replicated_grads``.

Both transformers generations are handled:
  * 5.x: ``gate`` is a router module returning ``(logits, top-k weights, top-k ids)`` (its
    softmax / top-k / normalisation are reused as they are); experts are fused
    ``gate_up_proj [E, 2F, H]`` / ``down_proj [E, H, F]`` parameters; the block returns the
    hidden states.
  * 4.x: ``gate`` is an ``nn.Linear``; routing is ``softmax(fp32) -> top-k -> normalise``
    (Qwen3-MoE: only if ``norm_topk_prob``) -> cast to the hidden dtype, as those blocks do;
    experts are an ``nn.ModuleList``; the block returns ``(hidden states, router logits)``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from deep_ep_ops.buffer import Buffer
from deep_ep_ops.nn.moe import ExpertParallelMoE, StackedGLUExperts, is_expert_parameter

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")


def _num_experts(block: nn.Module) -> int:
    for owner, name in ((block, "num_experts"), (block.gate, "num_experts"),
                        (block.experts, "num_experts")):
        if isinstance(getattr(owner, name, None), int):
            return getattr(owner, name)
    if isinstance(block.experts, nn.ModuleList):
        return len(block.experts)
    if isinstance(block.gate, nn.Linear):
        return block.gate.out_features
    raise ValueError(f"{type(block).__name__}: cannot tell its number of experts")


def shard_experts(experts: nn.Module, lo: int, hi: int) -> nn.Module:
    """Experts ``[lo, hi)`` of an HF experts container, as a module ``ExpertParallelMoE``
    runs: a ModuleList slice (4.x, the same expert modules) or a ``StackedGLUExperts`` holding
    copies of the fused weight rows (5.x)."""
    if isinstance(experts, nn.ModuleList):
        return nn.ModuleList(list(experts)[lo:hi])
    if not (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
        raise NotImplementedError(f"{type(experts).__name__}: expected fused gate_up_proj / "
                                  "down_proj parameters or an nn.ModuleList of experts")
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True) \
            or getattr(experts, "is_transposed", False) \
            or not getattr(experts, "is_concatenated", True):
        raise NotImplementedError(f"{type(experts).__name__}: only the gated, concatenated, "
                                  "untransposed, bias-free expert layout is supported")
    sharded = StackedGLUExperts(experts.gate_up_proj.detach()[lo:hi].clone(),
                                experts.down_proj.detach()[lo:hi].clone(), experts.act_fn)
    sharded.gate_up_proj.requires_grad_(experts.gate_up_proj.requires_grad)
    sharded.down_proj.requires_grad_(experts.down_proj.requires_grad)
    return sharded


class HFExpertParallelBlock(ExpertParallelMoE):
    """Drop-in for a Mixtral / Qwen3-MoE sparse MoE block, experts sharded over ``buffer``'s
    group. ``forward(hidden_states [B, S, H])`` returns what the original block returns."""

    def __init__(self, block: nn.Module, buffer: Buffer, **moe_kwargs) -> None:
        kind = type(block).__name__
        E = _num_experts(block)
        top_k = getattr(block, "top_k", None) or getattr(block.gate, "top_k")
        hidden = getattr(block.gate, "hidden_dim", None) or block.gate.weight.shape[1]
        for name, got, want in (("num_experts", E, buffer.num_experts),
                                ("num_topk", top_k, buffer.num_topk),
                                ("hidden", hidden, buffer.hidden)):
            if got != want:
                raise ValueError(f"{kind}: {name}={got} but the Buffer has {name}={want}")
        R, r = buffer.world_size, buffer.rank
        lo, hi = r * E // R, (r + 1) * E // R
        super().__init__(buffer, experts=shard_experts(block.experts, lo, hi), **moe_kwargs)
        self.kind = kind
        self.gate = block.gate                       # the model's router, replicated
        self.top_k = top_k
        self.expert_range = (lo, hi)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.norm_topk_prob = bool(getattr(block, "norm_topk_prob", True))
        self.router_module = not isinstance(block.gate, nn.Linear)   # transformers 5.x

    def route(self, hidden: torch.Tensor):
        """``(router_logits, topk_weights, topk_idx)`` exactly as the original block."""
        if self.router_module:
            return self.gate(hidden)
        logits = self.gate(hidden)
        weights = torch.softmax(logits, dim=1, dtype=torch.float)
        weights, idx = torch.topk(weights, self.top_k, dim=-1)
        if self.kind != "Qwen3MoeSparseMoeBlock" or self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden.dtype), idx

    def forward(self, hidden_states: torch.Tensor):
        B, S, H = hidden_states.shape
        if self.training and self.jitter_noise > 0:      # Mixtral's router jitter
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        hidden = hidden_states.reshape(-1, H).contiguous()
        logits, weights, idx = self.route(hidden)
        out = super().forward(hidden, idx.contiguous(),
                              weights.to(torch.float32).contiguous()).reshape(B, S, H)
        return out if self.router_module else (out, logits)


def shard_moe_blocks(model: nn.Module, buffer: Buffer,
                     block_types: Iterable[str] = SUPPORTED_BLOCKS,
                     **moe_kwargs) -> nn.Module:
    """Replace, in place, every MoE block of ``model`` whose class name is in ``block_types``
    by an ``HFExpertParallelBlock`` over ``buffer``'s group; returns ``model``.

    ``moe_kwargs`` go to ``ExpertParallelMoE`` (``layout``, ``exact``, ``expert_alignment``,
    ``expert_impl``, ``fp8``). The Buffer's ``num_max_tokens_per_rank`` must cover the
    tokens (batch x sequence) of one forward on a rank.
    """
    types = set(block_types)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module).__name__ in types]
    if not targets:
        raise ValueError(f"shard_moe_blocks: no {sorted(types)} in {type(model).__name__}")
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, HFExpertParallelBlock(block, buffer, **moe_kwargs))
    return model


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters every rank holds in full (all but the sharded experts)."""
    return [p for p in model.parameters() if not is_expert_parameter(p)]


def allreduce_replicated_grads(model: nn.Module, group: Optional[dist.ProcessGroup] = None,
                               average: bool = False) -> None:
    """Sum (or average) the gradients of the replicated parameters over ``group`` in one
    collective. Expert gradients are complete already: each expert lives on one rank and
    receives every rank's tokens."""
    grads = [p.grad for p in replicated_parameters(model) if p.grad is not None]
    for dtype in dict.fromkeys(g.dtype for g in grads):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= dist.get_world_size(group)
        offset = 0
        for g in same:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
