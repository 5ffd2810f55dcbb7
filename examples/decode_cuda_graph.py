"""Greedy decode of a Mixtral-style model whose MoE blocks run expert-parallel, one CUDA graph
per step (static capacity: no host sync). CUDA required:
    torchrun --nproc-per-node 2 examples/decode_cuda_graph.py"""
import os
import time

import torch
import torch.distributed as dist
import transformers
import deep_ep_ops
from deep_ep_ops.nn import shard_moe_blocks

rank = int(os.environ["RANK"])
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
torch.cuda.set_device(device)
dist.init_process_group("nccl", device_id=device)
B, PROMPT, NEW, H, E = 8, 16, 64, 256, 8
config = transformers.MixtralConfig(vocab_size=1024, hidden_size=H, intermediate_size=512,
                                    num_hidden_layers=4, num_attention_heads=8,
                                    num_key_value_heads=4, num_local_experts=E,
                                    num_experts_per_tok=2)
torch.manual_seed(0)  # same weights everywhere; each rank keeps its experts
model = transformers.MixtralForCausalLM(config).to(device, torch.bfloat16).eval()
buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=B, hidden=H, num_topk=2, num_experts=E)
shard_moe_blocks(model, buf)
cache = transformers.StaticCache(config=config, max_cache_len=PROMPT + NEW)
tok = torch.zeros(B, 1, dtype=torch.long, device=device)   # graph inputs, updated in place
pos = torch.zeros(1, dtype=torch.long, device=device)
@torch.no_grad()
def step():
    return model(input_ids=tok, position_ids=pos.expand(B, 1), cache_position=pos,
                 past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # warm-up: allocates the cache, JIT-builds the kernels
    for _ in range(3):
        step()
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    next_tok = step()
cache.reset()  # in place: warm-up and capture advanced the cache's own position counter
prompt = torch.randint(0, config.vocab_size, (B, PROMPT), device=device,
                       generator=torch.Generator(device).manual_seed(rank))
generated = []
torch.cuda.synchronize()
start = time.perf_counter()
for i in range(PROMPT + NEW - 1):  # the prompt goes through the same graph, token by token
    tok.copy_(prompt[:, i:i + 1] if i < PROMPT else next_tok.unsqueeze(1))
    pos.fill_(i)
    graph.replay()
    if i >= PROMPT - 1:
        generated.append(next_tok.clone())
torch.cuda.synchronize()
rate = B * (PROMPT + NEW - 1) / (time.perf_counter() - start)
print(f"rank {rank}: {rate:.0f} tokens/s; first tokens {torch.stack(generated, 1)[0, :8].tolist()}")
buf.destroy()
dist.destroy_process_group()
