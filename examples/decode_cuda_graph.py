"""Greedy decode of a Mixtral-style model whose MoE blocks run expert-parallel, one CUDA graph
per step (static capacity: no host sync). CUDA GPUs required.

    python examples/decode_cuda_graph.py [--ranks R] [--new-tokens N]

Spawns R ranks, one GPU each (NCCL; several per GPU under CUDA MPS when GPUs are fewer).
E = 4 experts per rank. Each rank decodes its own prompts twice through the same graphs; the
two runs must give the same tokens. Needs ``transformers``.
"""
from __future__ import annotations

import sys
import time

import torch

from deep_ep_ops.cli import OneLineErrorParser, int_at_least
from deep_ep_ops.local_ranks import RanksFailed, gpu_count, spawn

B, PROMPT, H, K = 8, 16, 256, 2   # sequences, prompt length, hidden, experts per token
EXPERTS_PER_RANK = 4


def decode(rank: int, world: int, new_tokens: int) -> dict:
    """Capture one decode step in a CUDA graph and decode this rank's prompts with it, twice."""
    import torch.distributed as dist
    import transformers

    import deep_ep_ops
    from deep_ep_ops.nn import shard_moe_blocks

    device = torch.device("cuda", torch.cuda.current_device())
    E = EXPERTS_PER_RANK * world
    config = transformers.MixtralConfig(vocab_size=1024, hidden_size=H, intermediate_size=512,
                                        num_hidden_layers=4, num_attention_heads=8,
                                        num_key_value_heads=4, num_local_experts=E,
                                        num_experts_per_tok=K)
    torch.manual_seed(0)  # same weights everywhere; each rank keeps its experts
    model = transformers.MixtralForCausalLM(config).to(device, torch.bfloat16).eval()
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=B, hidden=H, num_topk=K, num_experts=E)
    shard_moe_blocks(model, buf)
    cache = transformers.StaticCache(config=config, max_cache_len=PROMPT + new_tokens)
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # graph inputs, updated in place
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
    prompt = torch.randint(0, config.vocab_size, (B, PROMPT), device=device,
                           generator=torch.Generator(device).manual_seed(rank))

    def run() -> tuple[torch.Tensor, float]:
        cache.reset()  # in place: the graph keeps pointing at the same cache tensors
        generated = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(PROMPT + new_tokens - 1):  # the prompt goes through the same graph
            tok.copy_(prompt[:, i:i + 1] if i < PROMPT else next_tok.unsqueeze(1))
            pos.fill_(i)
            graph.replay()
            if i >= PROMPT - 1:
                generated.append(next_tok.clone())
        torch.cuda.synchronize()
        return torch.stack(generated, 1), time.perf_counter() - start

    first, seconds = run()
    second, _ = run()
    dist.barrier()
    buf.destroy()
    return dict(rate=B * (PROMPT + new_tokens - 1) / seconds, tokens=first[0, :8].tolist(),
                same=bool(torch.equal(first, second)), experts=E)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python examples/decode_cuda_graph.py",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int_at_least(1), default=None,
                        help="ranks to spawn (default: one per GPU)")
    parser.add_argument("--new-tokens", type=int_at_least(1), default=64,
                        help="tokens generated per sequence (default: 64)")
    args = parser.parse_args(argv)
    gpus = gpu_count()
    if gpus == 0:
        sys.exit("examples/decode_cuda_graph.py captures CUDA graphs and needs CUDA GPUs; this "
                 "machine has none. On a GPU machine: python examples/decode_cuda_graph.py "
                 "[--ranks R]")
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("examples/decode_cuda_graph.py needs transformers: pip install transformers")
    ranks = args.ranks or gpus
    try:
        results = spawn(decode, ranks, args.new_tokens, backend="nccl", what="decode_cuda_graph")
    except RanksFailed as exc:
        sys.exit(f"decode_cuda_graph failed:\n{exc}")
    for r, res in enumerate(results):
        print(f"rank {r}: {res['rate']:.0f} tokens/s; first tokens {res['tokens']}")
    same = all(res["same"] for res in results)
    print(f"checked: {ranks} ranks (nccl), E={results[0]['experts']} experts, "
          f"{args.new_tokens} new tokens for each of {B} sequences per rank, one CUDA graph "
          f"replay per token: two decodes of the same prompts "
          f"{'gave the same tokens' if same else 'DIFFER'} on every rank")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
