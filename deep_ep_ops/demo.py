"""Demo: an expert-parallel MoE step on local ranks, dispatch -> experts -> combine.

    python -m deep_ep_ops.demo [--ranks R] [--tokens T] [--hidden H] [--experts E] [--topk K]

CPU ranks over gloo by default, one GPU per rank over NCCL when GPUs are present (or with
``--backend nccl``). Prints what moved where and how long each op took, and checks each rank's
result against the same MoE computed densely with every expert at hand.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from deep_ep_ops.cli import OneLineErrorParser, int_at_least
from deep_ep_ops.local_ranks import RanksFailed, gpu_count, spawn


def _timed(fn: Callable, device: torch.device, repeats: int):
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


def _rank_main(rank: int, R: int, args: argparse.Namespace) -> dict:
    """One rank's MoE step; returns its statistics (the parent prints them)."""
    import deep_ep_ops
    from deep_ep_ops.nn import LocalExperts

    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" \
        else torch.device("cpu")
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

    ops, name = torch.ops.deep_ep, buf.group_name

    def run_dispatch():
        return ops.dispatch(x, None, topk_idx, topk_w, name, E, 1, True)

    for _ in range(2):  # warm-up (and the CUDA JIT build on first use)
        run_dispatch()
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
    buf.destroy()
    owner = topk_idx // E_loc
    return dict(tokens=T, rows=int(tpe.sum()), dispatch_us=t_dispatch, combine_us=t_combine,
                err=err, sent=[int((owner == r).any(-1).sum()) for r in range(R)],
                row_bytes=H * x.element_size(), transport=buf.transport)


TOLERANCE = 1e-4  # fp32 rows; the dense MoE adds the experts in another order


def _report(args: argparse.Namespace, stats: list[dict]) -> bool:
    R, E = args.ranks, args.experts
    transport = f", transport {stats[0]['transport']}" if stats[0]["transport"] else ""
    print(f"deep_ep_ops demo: {R} ranks ({args.backend}{transport}), T={args.tokens} "
          f"tokens/rank, H={args.hidden}, E={E} experts ({E // R}/rank), top-{args.topk}, "
          "expert-major layout")
    print("rank | tokens | tokens sent to ranks | (token,expert) rows received | "
          "dispatch us | combine us | max |out - dense|")
    for r, st in enumerate(stats):
        sent = " ".join(str(v) for v in st["sent"])
        print(f"{r:4d} | {st['tokens']:6d} | {sent:>20s} | {st['rows']:28d} | "
              f"{st['dispatch_us']:11.1f} | {st['combine_us']:10.1f} | {st['err']:.2e}")
    total = sum(sum(st["sent"]) for st in stats)
    print(f"moved {total} token rows ({total * stats[0]['row_bytes'] / 1e6:.2f} MB) in "
          f"dispatch and the same back in combine; times are medians of {args.repeats}")
    worst = max(st["err"] for st in stats)
    ok = worst <= TOLERANCE
    print(f"checked: combine(experts(dispatch(x))) {'equals' if ok else 'DIFFERS FROM'} the "
          f"dense MoE on all {R} ranks (max |difference| {worst:.1e}, tolerance {TOLERANCE:.0e})")
    return ok


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m deep_ep_ops.demo",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="gloo: CPU ranks; nccl: one CUDA GPU per rank (default: nccl "
                             "when GPUs are present, else gloo)")
    parser.add_argument("--ranks", type=int_at_least(1), default=None,
                        help="local ranks to spawn (default: the GPU count with nccl, else 2)")
    parser.add_argument("--tokens", type=int_at_least(1), default=64,
                        help="tokens per rank, T, also the Buffer's num_max_tokens_per_rank "
                             "(default: 64)")
    parser.add_argument("--hidden", type=int_at_least(1), default=128,
                        help="row width H of the fp32 rows (default: 128)")
    parser.add_argument("--experts", type=int_at_least(1), default=None,
                        help="experts E in all, a multiple of --ranks (default: 4 per rank)")
    parser.add_argument("--topk", type=int_at_least(1), default=2,
                        help="experts per token K, at most --experts (default: 2)")
    parser.add_argument("--repeats", type=int_at_least(1), default=5,
                        help="timed calls per op; the median is printed (default: 5)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The demo's arguments, completed and checked (argparse's one-line errors)."""
    parser = _parser()
    args = parser.parse_args(argv)
    gpus = gpu_count()
    if args.backend is None:
        args.backend = "nccl" if gpus else "gloo"
    if args.backend == "nccl":
        if gpus == 0:
            parser.error("--backend nccl needs CUDA GPUs and this machine has none; "
                         "use --backend gloo")
        if args.ranks is None:
            args.ranks = gpus
        if args.ranks > gpus:
            parser.error(f"--ranks {args.ranks} with --backend nccl needs {args.ranks} GPUs; "
                         f"this machine has {gpus}")
    if args.ranks is None:
        args.ranks = 2
    if args.experts is None:
        args.experts = 4 * args.ranks
    if args.experts % args.ranks:
        parser.error(f"--experts {args.experts} must be a multiple of --ranks {args.ranks}")
    if args.topk > args.experts:
        parser.error(f"--topk {args.topk} must be at most --experts {args.experts}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        stats = spawn(_rank_main, args.ranks, args, backend=args.backend, what="demo")
    except RanksFailed as exc:
        sys.exit(f"deep_ep_ops demo failed:\n{exc}")
    if not _report(args, stats):
        sys.exit(1)


if __name__ == "__main__":
    main()
