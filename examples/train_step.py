"""Training steps of a Qwen3-MoE-style model whose MoE blocks run expert-parallel: each rank
feeds its own batch, keeps E/R experts, and sums the replicated parameters' gradients.

    python examples/train_step.py [--ranks R] [--steps N] [--backend gloo|nccl]

Spawns R local ranks: CPU over gloo by default, one GPU per rank over NCCL with
``--backend nccl``. E = 4 experts per rank, so any rank count works. Needs ``transformers``.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from deep_ep_ops.cli import OneLineErrorParser, int_at_least
from deep_ep_ops.local_ranks import RanksFailed, gpu_count, spawn

B, S, H, K = 4, 16, 64, 2      # batch, sequence, hidden, experts per token
EXPERTS_PER_RANK = 4


def train(rank: int, world: int, steps: int, backend: str) -> dict:
    """``steps`` optimizer steps on this rank's batches; returns the losses and how far this
    rank's replicated parameters are from rank 0's after the last step."""
    import transformers

    import deep_ep_ops
    from deep_ep_ops.nn import allreduce_replicated_grads, replicated_parameters, shard_moe_blocks

    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    E = EXPERTS_PER_RANK * world
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=H, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=E, num_experts_per_tok=K, mlp_only_layers=[])
    torch.manual_seed(0)  # identical replicas before sharding
    model = transformers.Qwen3MoeForCausalLM(config).to(device)
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=B * S, hidden=H, num_topk=K, num_experts=E)
    shard_moe_blocks(model, buf, layout="expert_major")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # every rank its own data
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (B, S), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        (loss / world).backward()              # the global loss: mean over ranks
        allreduce_replicated_grads(model)      # experts' gradients are complete already
        opt.step()
        losses.append(loss.item())
    # the replicas must still be identical: compare with rank 0's copy
    flat = torch.cat([p.detach().reshape(-1) for p in replicated_parameters(model)])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    drift = (flat - reference).abs().max().item()
    buf.destroy()
    return dict(losses=losses, drift=drift, experts=E)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python examples/train_step.py",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int_at_least(1), default=2,
                        help="local ranks to spawn (default: 2)")
    parser.add_argument("--steps", type=int_at_least(1), default=3,
                        help="optimizer steps (default: 3)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                        help="gloo: CPU ranks; nccl: one CUDA GPU per rank (default: gloo)")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and gpu_count() < args.ranks:
        parser.error(f"--backend nccl with --ranks {args.ranks} needs {args.ranks} CUDA GPUs; "
                     f"this machine has {gpu_count()}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("examples/train_step.py needs transformers: pip install transformers")
    try:
        results = spawn(train, args.ranks, args.steps, args.backend, what="train_step")
    except RanksFailed as exc:
        sys.exit(f"train_step failed:\n{exc}")
    for step in range(args.steps):
        losses = "  ".join(f"rank {r}: {res['losses'][step]:.4f}" for r, res in
                           enumerate(results))
        print(f"step {step}: loss  {losses}")
    finite = all(math.isfinite(v) for res in results for v in res["losses"])
    drift = max(res["drift"] for res in results)
    ok = finite and drift == 0.0
    steps = f"{args.steps} step{'s' if args.steps > 1 else ''}"
    print(f"checked: {steps} on {args.ranks} ranks ({args.backend}), "
          f"E={results[0]['experts']} experts ({EXPERTS_PER_RANK} per rank): losses "
          f"{'finite' if finite else 'NOT FINITE'}, replicated parameters "
          f"{'identical on every rank' if drift == 0.0 else f'DIFFER by up to {drift:.1e}'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
