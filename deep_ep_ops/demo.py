"""Demo: spawn local ranks and run an expert-parallel MoE step, dispatch -> experts -> combine.

    python -m deep_ep_ops.demo [--ranks 2] [--tokens 64] [--hidden 128] [--experts 8] [--topk 2]

Uses gloo and CPU tensors by default, NCCL and one GPU per rank when GPUs are present (or with
``--backend nccl``). Prints what moved where, how long each op took, and checks the result
against the same MoE computed densely on one rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deep_ep_ops.local_ranks import free_port


def _timed(fn, device: torch.device, repeats: int):
    """Run ``fn`` ``repeats`` times; median wall time in microseconds and the last result."""
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times), out


def _rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    import deep_ep_ops
    from deep_ep_ops.nn import LocalExperts

    R = args.ranks
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=R, device_id=device)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=R)
    E, K, H, T = args.experts, args.topk, args.hidden, args.tokens
    E_loc = E // R
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=T, hidden=H, num_topk=K, num_experts=E)
    # Every rank builds all experts from one seed and keeps its own shard, so the dense
    # check below can run anywhere.
    torch.manual_seed(0)
    all_experts = LocalExperts(E, H, 2 * H, device=device)
    mine = LocalExperts(E_loc, H, 2 * H, device=device)
    with torch.no_grad():
        for name, p in mine.named_parameters():
            p.copy_(getattr(all_experts, name)[rank * E_loc:(rank + 1) * E_loc])
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(T, H, generator=gen).to(device)
    scores = torch.randn(T, E, generator=gen).softmax(-1).to(device)
    topk_w, topk_idx = scores.topk(K, dim=-1)

    ops = torch.ops.deep_ep
    name = buf.group_name

    def run_dispatch():
        return ops.dispatch(x, None, topk_idx, topk_w, name, E, 1, True)

    for _ in range(2):  # warm-up (and the CUDA JIT build on first use)
        recv_x, _, recv_idx, recv_w, tpe, handle = run_dispatch()
    t_dispatch, (recv_x, _, recv_idx, recv_w, tpe, handle) = _timed(run_dispatch, device,
                                                                    args.repeats)
    with torch.no_grad():
        y = mine(recv_x, recv_idx)
    t_combine, out = _timed(lambda: ops.combine(y, handle, recv_w, name), device, args.repeats)

    # dense check: the same MoE on this rank's tokens with every expert at hand
    with torch.no_grad():
        dense = torch.zeros_like(x)
        for k in range(K):
            for e in range(E):
                m = topk_idx[:, k] == e
                if m.any():
                    dense[m] += topk_w[m, k, None] * all_experts.expert(e, x[m])
    err = (out - dense).abs().max().item()

    sends = torch.zeros(R, dtype=torch.long)
    for r in range(R):
        sends[r] = int(((topk_idx // E_loc) == r).any(-1).sum())
    rows = int(tpe.sum())
    row_bytes = H * x.element_size()
    stats = torch.tensor([T, rows, t_dispatch, t_combine, err, *sends.tolist()],
                         dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(R)]
    dist.all_gather(gathered, stats.to(device) if args.backend == "nccl" else stats)
    if rank == 0:
        print(f"deep_ep_ops demo: {R} ranks ({args.backend}), T={T} tokens/rank, H={H}, "
              f"E={E} experts ({E_loc}/rank), top-{K}, expert-major layout")
        print("rank | tokens | tokens sent to ranks | (token,expert) rows received | "
              "dispatch us | combine us | max |out - dense|")
        for r, st in enumerate(gathered):
            st = st.cpu()
            sent = " ".join(str(int(v)) for v in st[5:])
            print(f"{r:4d} | {int(st[0]):6d} | {sent:>20s} | {int(st[1]):28d} | "
                  f"{st[2]:11.1f} | {st[3]:10.1f} | {st[4]:.2e}")
        total_sent = sum(int(st[5:].sum()) for st in gathered)
        print(f"moved {total_sent} token rows ({total_sent * row_bytes / 1e6:.2f} MB) in "
              f"dispatch and the same back in combine; times are medians of {args.repeats}")
    ok = err < 1e-4 if x.dtype == torch.float32 else err < 1e-2
    buf.destroy()
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(f"rank {rank}: combine differs from the dense MoE by {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    has_gpus = torch.cuda.is_available() and torch.cuda.device_count() > 0
    parser.add_argument("--backend", choices=("gloo", "nccl"),
                        default="nccl" if has_gpus else "gloo")
    parser.add_argument("--ranks", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if args.backend == "nccl" else 2
    if args.experts % args.ranks:
        parser.error(f"--experts {args.experts} must be divisible by --ranks {args.ranks}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.start_processes(_rank_main, args=(args, free_port()), nprocs=args.ranks,
                       start_method="spawn")


if __name__ == "__main__":
    main()
