"""pp_send_recv / cp_all_gather / cp_reduce_scatter / engram_fetch benchmark, side by side with
NCCL (send/recv, all_gather_into_tensor, reduce_scatter_tensor) and the copy-engine limits, all
measured in the same run.

    python -m bench.bench_comm [--ranks R] [--ranks-per-gpu N] [--quick] [--kind LABEL]

One process per rank (NCCL), one GPU each or N per GPU under MPS. Writes
bench/results/<kind>-R<R>[-<N>pergpu]-<date>-comm.{json,md}. Times are medians
of CUDA-event timings per call (all ranks start together after a barrier; the slowest rank is
reported); small sizes also get CUDA-graph replay times. Size S: pp = bytes each rank sends (to
rank+1, while receiving S from rank-1); all-gather = input bytes per rank; reduce-scatter =
output bytes per rank (input R*S). Link GB/s (1e9 B/s) = bytes each rank receives over NVLink
((R-1)*S for the collectives, S for pp) / time, against the copy-engine limit of the same run
(both directions busy: peer_both_ways_GBps). SMs: the largest grid of any kernel the op launched
(profiler), and its kernels' total time: the copy-engine paths launch only 1-CTA signalling
kernels (and reduce-scatter one reduction kernel).
"""
from __future__ import annotations

import json
import tempfile

import torch
import torch.distributed as dist

from bench import baselines
from bench import report as report_io
from bench.timing import event_median_us, graph_replay_us
from deep_ep_ops.local_ranks import spawn

KiB, MiB = 1 << 10, 1 << 20


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _kernels(fn, calls: int = 3) -> dict:
    """Kernels one call launches: the largest grid (CTAs) and their summed device time."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as g:
            trace = json.load(g)
    ctas, total_us, names = 0, 0.0, set()
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") != "kernel":
            continue
        grid = ev.get("args", {}).get("grid", [1, 1, 1])
        ctas = max(ctas, int(grid[0]) * int(grid[1]) * int(grid[2]))
        total_us += float(ev.get("dur", 0.0))
        names.add(ev.get("name", "?")[:60])
    return {"max_ctas": ctas, "kernel_us_per_call": total_us / calls, "kernels": sorted(names)}


def _sizes(quick: bool) -> list[int]:
    if quick:
        return [4 * KiB, 64 * KiB, MiB, 16 * MiB]
    return [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]


def _measure(fn, iters: int, graph: bool) -> dict:
    res = {"us": _max_over_ranks(event_median_us(fn, iters=iters))}
    if graph:
        try:
            t = graph_replay_us(fn, iters=max(5, iters // 2))
        except Exception as exc:  # noqa: BLE001 - a baseline that does not capture: say so
            t, res["graph_error"] = float("nan"), f"{type(exc).__name__}: {exc}"[:200]
        res["graph_us"] = _max_over_ranks(t)
    try:
        res.update(_kernels(fn))
    except Exception as exc:  # noqa: BLE001 - profiler unavailable
        res.update(max_ctas=-1, kernel_us_per_call=float("nan"),
                   kernels=[f"profiler failed: {exc}"[:200]])
    return res


def run_comm(rank: int, R: int, sizes: list[int], iters: int) -> list[dict]:
    import deep_ep_ops
    ops = torch.ops.deep_ep
    dev = torch.device("cuda", torch.cuda.current_device())
    top = max(sizes)
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=512, hidden=128, num_topk=1,
                             num_experts=R, pp_max_bytes=top, cp_max_bytes=R * top)
    name = buf.group_name
    nxt, prv = (rank + 1) % R, (rank - 1) % R
    rows = []
    for S in sizes:
        n = S // 2  # bf16 elements
        x = torch.randn(n, device=dev).to(torch.bfloat16)
        y = torch.empty_like(x)
        xr = torch.randn(R * n, device=dev).to(torch.bfloat16)
        gathered = torch.empty(R * n, device=dev, dtype=torch.bfloat16)
        scattered = torch.empty(n, device=dev, dtype=torch.bfloat16)
        small = S <= 256 * KiB
        it = iters if S < 64 * MiB else max(5, iters // 3)

        def pp():
            return ops.pp_send_recv(x, nxt, prv, [n], torch.bfloat16, name)

        def nccl_pp():
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt),
                                            dist.P2POp(dist.irecv, y, prv)])
            for w in works:
                w.wait()

        def ag():
            return ops.cp_all_gather(x, name)

        def nccl_ag():
            dist.all_gather_into_tensor(gathered, x)

        def rs():
            return ops.cp_reduce_scatter(xr, name)

        def nccl_rs():
            dist.reduce_scatter_tensor(scattered, xr)

        link = S if R > 1 else 0
        for op, mine, theirs, link_bytes in (("pp_send_recv", pp, nccl_pp, link),
                                             ("cp_all_gather", ag, nccl_ag, (R - 1) * S),
                                             ("cp_reduce_scatter", rs, nccl_rs, (R - 1) * S)):
            ours = _measure(mine, it, small)
            ref = _measure(theirs, it, small)
            rows.append({"op": op, "bytes": S, "R": R, "ours": ours, "nccl": ref,
                         "link_bytes": link_bytes,
                         "ours_link_GBps": link_bytes / ours["us"] / 1e3,
                         "nccl_link_GBps": link_bytes / ref["us"] / 1e3})
        torch.cuda.empty_cache()
    buf.destroy()
    return rows


def run_engram(rank: int, R: int, iters: int, n: int = 1 << 20, N: int = 512, L: int = 24,
               H: int = 128) -> dict:
    import deep_ep_ops
    ops = torch.ops.deep_ep
    dev = torch.device("cuda", torch.cuda.current_device())
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=N, hidden=H, num_topk=1, num_experts=R,
                             pp_max_bytes=0, cp_max_bytes=0)
    name = buf.group_name
    table = buf.engram_table(n, H, torch.bfloat16, max_fetch_rows=N * L)
    table.copy_(torch.randn(n, H, device=dev).to(torch.bfloat16))
    g = torch.Generator(device="cpu").manual_seed(77 + rank)
    idx = torch.randint(0, R * n, (N, L), generator=g).to(dev)
    remote = int(((idx // n) != rank).sum())

    def fetch():
        return ops.engram_fetch(table, idx, name)

    res = {"table_rows_per_rank": n, "N": N, "L": L, "H": H, "R": R}
    res.update({"fetch": _measure(fetch, iters, True)})
    rows = N * L
    row_bytes = H * 2
    for key in ("us", "graph_us"):
        t = res["fetch"][key]
        res[f"rows_per_s_{key}"] = rows / t * 1e6
        res[f"GBps_{key}"] = rows * row_bytes / t / 1e3
        res[f"link_GBps_{key}"] = _max_over_ranks(remote * row_bytes / t / 1e3)
    res["remote_rows"] = remote
    grad = torch.randn(N, L * H, device=dev).to(torch.bfloat16)

    def backward():
        return ops._engram_scatter_add(grad, idx, name, n, H)

    res["scatter_add"] = _measure(backward, max(5, iters // 3), False)
    buf.destroy()
    return res


def _rank_main(rank: int, R: int, args) -> dict:
    iters = 5 if args.quick else 20
    return {"comm": run_comm(rank, R, _sizes(args.quick), iters),
            "engram": run_engram(rank, R, iters, n=(1 << 16) if args.quick else (1 << 20))}


def _fmt_size(b: int) -> str:
    return f"{b // MiB} MiB" if b >= MiB else f"{b // KiB} KiB"


def _markdown(report: dict) -> str:
    lim = report["limits"]
    both = lim.get("peer_both_ways_GBps", float("nan"))
    lines = [f"# PP / CP / Engram benchmark: {report['kind']}, {report['date']}", "",
             f"R = {report['ranks']}. Copy-engine limits measured in this run (256 MiB): " +
             ", ".join(f"{k} = {v:.1f}" for k, v in lim.items() if k.endswith("GBps")), "",
             "Link GB/s = bytes each rank receives over NVLink / time; vs CE = ours / "
             "peer_both_ways. CTAs = largest kernel grid of one call (profiler); kernel us = "
             "summed kernel time of one call (spin-waits included).", "",
             "| op | size | ours us | NCCL us | ours / NCCL time | ours link GB/s | vs CE | "
             "NCCL link GB/s | ours graph us | NCCL graph us | ours CTAs / kernel us | "
             "NCCL CTAs / kernel us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["comm"]:
        o, n = r["ours"], r["nccl"]
        lines.append(
            f"| {r['op']} | {_fmt_size(r['bytes'])} | {o['us']:.1f} | {n['us']:.1f} | "
            f"{o['us'] / n['us']:.2f} | {r['ours_link_GBps']:.0f} | "
            f"{r['ours_link_GBps'] / both:.2f} | {r['nccl_link_GBps']:.0f} | "
            f"{o.get('graph_us', float('nan')):.1f} | {n.get('graph_us', float('nan')):.1f} | "
            f"{o['max_ctas']} / {o['kernel_us_per_call']:.1f} | "
            f"{n['max_ctas']} / {n['kernel_us_per_call']:.1f} |")
    e = report["engram"]
    one = lim.get("peer_one_way_GBps", float("nan"))
    lines += ["", f"Engram fetch: {e['N']} tokens x {e['L']} entries x H={e['H']} bf16, "
              f"{e['table_rows_per_rank']} rows per rank, uniform random rows "
              f"({e['remote_rows']} of {e['N'] * e['L']} remote on rank 0).", "",
              "| mode | us | Mrows/s | GB/s (all rows) | link GB/s (remote rows) | "
              "link vs CE one-way |", "|---|---|---|---|---|---|"]
    for key, label in (("us", "eager"), ("graph_us", "CUDA graph")):
        lines.append(f"| {label} | {e['fetch'][key]:.1f} | {e[f'rows_per_s_{key}'] / 1e6:.1f} | "
                     f"{e[f'GBps_{key}']:.0f} | {e[f'link_GBps_{key}']:.0f} | "
                     f"{e[f'link_GBps_{key}'] / one:.2f} |")
    lines += ["", f"Engram backward (_engram_scatter_add, dense [n, H] gradient included): "
              f"{e['scatter_add']['us']:.1f} us"]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = report_io.parse_args(__doc__.splitlines()[0])
    limits = (baselines.copy_engine_limits(64 * MiB if args.quick else 256 * MiB)
              if args.ranks_per_gpu == 1 else {})
    results = spawn(_rank_main, args.ranks, args, backend="nccl",
                    ranks_per_gpu=args.ranks_per_gpu, timeout_s=3600, what="bench_comm")[0]
    report = {"kind": args.kind, "date": report_io.today(), "ranks": args.ranks,
              "ranks_per_gpu": args.ranks_per_gpu, "limits": limits, "torch": torch.__version__,
              "timing": "CUDA events, median, slowest rank; graph: CUDA-graph replay per call",
              **results}
    report_io.save(report, args, "-comm", _markdown)


if __name__ == "__main__":
    main()
