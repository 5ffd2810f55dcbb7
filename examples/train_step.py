"""Training steps of a Qwen3-MoE-style model whose MoE blocks run expert-parallel: each rank
feeds its own batch, keeps E/R experts, and sums the replicated parameters' gradients.
    python examples/train_step.py [RANKS]    # local gloo ranks on CPU (default 2)
    torchrun --nproc-per-node 2 examples/train_step.py   # NCCL when CUDA is present"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
import deep_ep_ops
from deep_ep_ops.nn import allreduce_replicated_grads, shard_moe_blocks

B, S, H, E, K = 4, 16, 64, 8, 2


def main(rank: int, world: int) -> None:
    cuda = torch.cuda.is_available() and "RANK" in os.environ
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
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
    for it in range(3):
        ids = torch.randint(0, config.vocab_size, (B, S), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        (loss / world).backward()              # the global loss: mean over ranks
        allreduce_replicated_grads(model)      # experts' gradients are complete already
        opt.step()
        print(f"rank {rank} step {it}: loss {loss.item():.4f}")
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # torchrun
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29533"))
        world_size = int(sys.argv[1]) if len(sys.argv) > 1 else 2
        mp.spawn(main, args=(world_size,), nprocs=world_size)
