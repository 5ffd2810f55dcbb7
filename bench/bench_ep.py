"""EP dispatch/combine benchmark, side by side with same-run baselines.

    python -m bench.bench_ep [--ranks R] [--ranks-per-gpu N] [--quick] [--kind LABEL]

One process per rank (NCCL), one GPU each, or N ranks per GPU under MPS (each with 100/N % of
the SMs; peer memory by CUDA IPC). Writes bench/results/<kind>-R<R>[-<N>pergpu]-<date>.
{json,md,png}. Times are medians of CUDA-event timings of back-to-back calls (all ranks starting
together after a barrier; the slowest rank is reported); decode times are CUDA-graph replay
times per op. Baselines in the same run: every rank copying the bytes it receives (d2d, all at
once: the memory-bound limit when ranks share a GPU), the copy-engine peer limits (one GPU per
rank), NCCL all_to_all_single of the same payload.
Bandwidths (1e9 B/s): "logical" counts every received row including the local rank's (as
DeepEP reports); "nvlink" counts only rows that crossed the link.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bench import baselines
from bench import report as report_io
from bench.timing import event_median_us, graph_replay_us, host_overhead_us, sms_used
from deep_ep_ops.local_ranks import spawn
from deep_ep_ops.nn.moe import quantize_fp8

CALLS_PER_SAMPLE = 10  # back-to-back calls per timed sample


def _inputs(rank: int, T: int, H: int, E: int, K: int, fp8: bool, device):
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=torch.bfloat16)
    scores = torch.rand(T, E, generator=g)
    topk_idx = scores.topk(K, dim=-1).indices.to(device)  # uniform random top-k
    topk_w = torch.rand(T, K, generator=g).to(device)
    scales = None
    if fp8:
        x, scales = quantize_fp8(x)
    return x, scales, topk_idx, topk_w


def _row_counts(handle: torch.Tensor, T: int, rank: int) -> tuple[int, int]:
    """(valid rows received, of which local) from a dispatch handle."""
    from deep_ep_ops import handle as Hd
    valid = int(handle[0, Hd.HDR_VALID_ROWS])
    recv = handle[Hd.HEADER_ROWS + T: Hd.HEADER_ROWS + T + valid]
    local = int((recv[:, Hd.RECV_SRC_RANK] == rank).sum())
    return valid, local


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sum_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t)
    return float(t)


class _Calls:
    """A Buffer, the inputs of one workload and its dispatch / combine calls."""

    def __init__(self, rank: int, T: int, H: int, E: int, K: int, fp8: bool, num_sms: int,
                 direct: int = 0, zero_copy_combine: bool = False):
        import deep_ep_ops
        device = torch.device("cuda", torch.cuda.current_device())
        self.buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                                      num_experts=E, fp8_dispatch=fp8, direct_outputs=direct,
                                      zero_copy_combine=zero_copy_combine)
        self.x, self.scales, self.idx, self.w = _inputs(rank, T, H, E, K, fp8, device)
        self.E, self.num_sms = E, num_sms
        out = self.dispatch()
        self.handle = out[5]
        self.y = torch.randn(out[0].shape[0], H, device=device, dtype=torch.bfloat16)
        if zero_copy_combine:  # the expert outputs in a combine-input slot: read in place
            self.y = self.buf.combine_input(out[0].shape[0]).copy_(self.y)

    def dispatch(self):
        return torch.ops.deep_ep.dispatch(self.x, self.scales, self.idx, self.w,
                                          self.buf.group_name, self.E, 1, False, False,
                                          self.num_sms)

    def combine(self):
        return torch.ops.deep_ep.combine(self.y, self.handle, None, self.buf.group_name,
                                         self.num_sms)


def count_sms(rank: int, T: int, H: int, E: int, K: int, fp8: bool) -> dict:
    """SMs that one dispatch and one combine occupy (one profiled call each). Run after every
    timing: the profiler may leave hooks that slow later launches."""
    calls = _Calls(rank, T, H, E, K, fp8, 0)
    res = {"dispatch_sms": sms_used(calls.dispatch), "combine_sms": sms_used(calls.combine)}
    calls.buf.destroy()
    return res


def gpu_line_up(buf):
    """A tiny all-gather on ``buf``: the ranks leave it together on the GPU (event_median_us's
    ``device_sync``)."""
    tiny = torch.zeros(4, device="cuda")
    return lambda: torch.ops.deep_ep.cp_all_gather(tiny, buf.group_name)


def copy_us(buf, num_bytes: int, iters: int) -> float:
    """Every rank copying ``num_bytes`` device-to-device at once (with the SMs it has): the
    slowest rank's median time of one copy. The ranks are lined up on the GPU first, so the
    copies overlap as the op's transfers do."""
    src = torch.randint(0, 255, (max(num_bytes, 1),), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _max_over_ranks(event_median_us(
        lambda: dst.copy_(src), iters=iters, calls_per_sample=CALLS_PER_SAMPLE,
        device_sync=gpu_line_up(buf)))


def run_workload(rank: int, R: int, T: int, H: int, E: int, K: int, fp8: bool, num_sms: int,
                 iters: int, decode: bool = False, baseline: bool = True,
                 direct: int = 0, zero_copy_combine: bool = False, line_up: bool = True) -> dict:
    calls = _Calls(rank, T, H, E, K, fp8, num_sms, direct, zero_copy_combine)
    buf, dispatch, combine, handle = calls.buf, calls.dispatch, calls.combine, calls.handle
    x, scales, idx = calls.x, calls.scales, calls.idx
    device = x.device
    row_bytes = H * x.element_size() + (scales.shape[1] * 4 if scales is not None else 0)
    valid, local = _row_counts(handle, T, rank)
    res = {"T": T, "H": H, "E": E, "K": K, "R": R, "fp8": fp8, "num_sms": num_sms,
           "direct_outputs": direct, "zero_copy_combine": zero_copy_combine}
    # line_up: a tiny collective right before each sample's start event lines the ranks up on
    # the GPU, so a sample does not include one rank waiting for another's late start (with
    # 10 calls per sample that skew was up to tens of us per call); without it the first call
    # of the sample absorbs the skew (the method of the runs before 2026-12-02's last)
    sync = gpu_line_up(buf) if line_up else None
    if decode:
        t_d = graph_replay_us(dispatch, iters=iters, device_sync=sync)
        t_c = graph_replay_us(combine, iters=iters, device_sync=sync)
    else:
        t_d = event_median_us(dispatch, iters=iters, calls_per_sample=CALLS_PER_SAMPLE,
                              device_sync=sync)
        t_c = event_median_us(combine, iters=iters, calls_per_sample=CALLS_PER_SAMPLE,
                              device_sync=sync)
        if direct:  # how the timed dispatches placed their outputs (all direct, or say so)
            res["direct_output_stats"] = dict(buf.ep_state.direct_output_stats)
        if zero_copy_combine:  # how the timed combines made their partials available
            res["combine_input_stats"] = dict(buf.ep_state.combine_input_stats)
        res["dispatch_host_us"] = _max_over_ranks(host_overhead_us(dispatch))
        res["combine_host_us"] = _max_over_ranks(host_overhead_us(combine))
    res["dispatch_us"] = _max_over_ranks(t_d)
    res["combine_us"] = _max_over_ranks(t_c)
    recv_bytes = _sum_over_ranks(valid * row_bytes) / R  # per rank, averaged
    link_bytes = _sum_over_ranks((valid - local) * row_bytes) / R
    comb_row = H * 2
    res["dispatch_logical_GBps"] = recv_bytes / res["dispatch_us"] / 1e3
    res["dispatch_nvlink_GBps"] = link_bytes / res["dispatch_us"] / 1e3
    res["combine_logical_GBps"] = recv_bytes / row_bytes * comb_row / res["combine_us"] / 1e3
    res["combine_nvlink_GBps"] = link_bytes / row_bytes * comb_row / res["combine_us"] / 1e3

    if baseline:
        # the bytes this rank receives (dispatch) / sends back (combine), copied by every rank
        res["dispatch_copy_us"] = copy_us(buf, valid * row_bytes, iters)
        res["combine_copy_us"] = copy_us(buf, valid * comb_row, iters)
        nccl = baselines.NcclDispatcher(idx, E)
        packed = x.view(torch.uint8) if scales is None else torch.cat(
            [x.view(torch.uint8), scales.view(torch.uint8)], dim=1)
        yb = torch.randn(nccl.num_recv, H, device=device, dtype=torch.bfloat16)
        if decode:
            res["nccl_dispatch_us"] = _max_over_ranks(
                graph_replay_us(lambda: nccl.dispatch(packed), iters=iters))
            res["nccl_combine_us"] = _max_over_ranks(
                graph_replay_us(lambda: nccl.combine(yb), iters=iters))
        else:
            res["nccl_dispatch_us"] = _max_over_ranks(
                event_median_us(lambda: nccl.dispatch(packed), iters=max(3, iters // 3)))
            res["nccl_combine_us"] = _max_over_ranks(
                event_median_us(lambda: nccl.combine(yb), iters=max(3, iters // 3)))
    buf.destroy()
    return res


def _rank_main(rank: int, R: int, args) -> dict:
    H, E, K = 7168, 256, 8
    iters = 5 if args.quick else 30
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    results: dict = {"workloads": [], "sm_sweep": [], "token_sweep": [], "sms_per_rank": sms}
    T0 = 512 if args.quick else 4096
    prefill = [(T0, True, 0), (T0, True, 24), (T0, False, 0), (T0, False, 24)]
    if not args.quick:
        prefill.append((8192, True, 0))
    # --direct-outputs N / --zero-copy-combine: each prefill workload also on a Buffer with
    # N direct-output slots and combine inputs read in place (same run)
    variants = [(0, False)]
    if R > 1 and (args.direct_outputs or args.zero_copy_combine):
        variants.append((args.direct_outputs, args.zero_copy_combine))
    for T, fp8, num_sms in prefill:
        if num_sms > sms:
            continue
        with_sms = f", {num_sms} SMs" if num_sms else ""
        for direct, zcc in variants:
            extras = ([", direct outputs"] if direct else []) + ([", zero-copy combine"]
                                                                  if zcc else [])
            results["workloads"].append(
                dict(name=f"prefill T={T} {'FP8' if fp8 else 'BF16'}{with_sms}{''.join(extras)}",
                     **run_workload(rank, R, T, H, E, K, fp8, num_sms, iters, direct=direct,
                                    zero_copy_combine=zcc, line_up=args.line_up)))
    results["workloads"].append(
        dict(name="decode T=128 FP8 (CUDA graph)",
             **run_workload(rank, R, 128, H, E, K, True, 0, iters, decode=True,
                            line_up=args.line_up)))
    if args.sweeps:
        sm_values = [s for s in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 132) if s <= sms]
        for s in (sm_values if not args.quick else [4, 16]):
            results["sm_sweep"].append(run_workload(rank, R, T0, H, E, K, True, s,
                                                    max(5, iters // 3), baseline=False,
                                                    line_up=args.line_up))
        t_values = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192) if not args.quick else (1, 128)
        for T in t_values:
            results["token_sweep"].append(run_workload(rank, R, T, H, E, K, True, 0,
                                                       max(5, iters // 3),
                                                       line_up=args.line_up))
    # the SM sweep's count is its num_sms
    for w in results["workloads"] + results["token_sweep"]:
        if not w["num_sms"]:
            w.update(count_sms(rank, w["T"], H, E, K, w["fp8"]))
    return results


def _markdown(report: dict) -> str:
    lim = report["limits"]
    lines = [f"# EP benchmark: {report['kind']}, {report['date']}", "",
             f"R = {report['ranks']} ranks, {report['ranks_per_gpu']} per GPU "
             f"({report['sms_per_rank']} SMs visible per rank). Times: {report['timing']}.",
             "Limits measured in this run (copies of 256 MiB, CUDA events): " +
             (", ".join(f"{k} = {v:.1f}" for k, v in lim.items() if k.endswith("GBps"))
              or "none"), "",
             "| workload | dispatch us | combine us | dispatch GB/s logical / nvlink | "
             "combine GB/s logical / nvlink | SMs used (d / c) | NCCL a2a dispatch us | "
             "NCCL a2a combine us | host us (d / c) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in report["workloads"]:
        lines.append(
            f"| {w['name']} | {w['dispatch_us']:.1f} | {w['combine_us']:.1f} | "
            f"{w['dispatch_logical_GBps']:.0f} / {w['dispatch_nvlink_GBps']:.0f} | "
            f"{w['combine_logical_GBps']:.0f} / {w['combine_nvlink_GBps']:.0f} | "
            f"{_sms_cell(w)} | {w.get('nccl_dispatch_us', float('nan')):.1f} | "
            f"{w.get('nccl_combine_us', float('nan')):.1f} | "
            f"{w.get('dispatch_host_us', float('nan')):.1f} / "
            f"{w.get('combine_host_us', float('nan')):.1f} |")
    lines += _ratio_lines(report)
    lines += _copy_ratio_lines(report)
    lines += ["", "SM sweep (FP8 dispatch, BF16 combine):", "",
              "| num_sms | dispatch us | combine us | dispatch nvlink GB/s | "
              "combine nvlink GB/s |", "|---|---|---|---|---|"]
    for w in report["sm_sweep"]:
        lines.append(f"| {w['num_sms']} | {w['dispatch_us']:.1f} | {w['combine_us']:.1f} | "
                     f"{w['dispatch_nvlink_GBps']:.0f} | {w['combine_nvlink_GBps']:.0f} |")
    lines += ["", "Token sweep (FP8):", "",
              "| T | dispatch us | combine us | SMs used (d / c) | NCCL dispatch us | "
              "NCCL combine us |", "|---|---|---|---|---|---|"]
    for w in report["token_sweep"]:
        lines.append(f"| {w['T']} | {w['dispatch_us']:.1f} | {w['combine_us']:.1f} | "
                     f"{_sms_cell(w)} | {w.get('nccl_dispatch_us', float('nan')):.1f} | "
                     f"{w.get('nccl_combine_us', float('nan')):.1f} |")
    lines += ["", "Other libraries: " + "; ".join(f"{k}: {v}" for k, v in
                                                  report["peers"].items())]
    return "\n".join(lines) + "\n"


def _sms_cell(w: dict) -> str:
    def one(v):
        return "n/a" if v is None else str(v)
    return f"{one(w.get('dispatch_sms'))} / {one(w.get('combine_sms'))}"


def _ratio_lines(report: dict) -> list[str]:
    """Each workload against the limit measured in the same run: with one rank the local
    permute against the d2d copy (bytes counted once, as the logical rate counts them), with
    several the NVLink rate against the both-ways peer copy; and NCCL's time over ours."""
    lim = report["limits"]
    one_rank = report["ranks"] == 1
    limit = lim.get("d2d_copy_GBps", float("nan")) / 2 if one_rank else \
        lim.get("peer_both_ways_GBps", float("nan"))
    rate = "logical" if one_rank else "nvlink"
    name = "d2d copy" if one_rank else "both-ways peer copy"
    if limit != limit:  # not measured: the ranks share a GPU, there is no link to measure
        return ["", f"Ratios: no {name} limit in this run (ranks share a GPU); see the "
                "same-run copy below."]
    lines = ["", f"Ratios: {rate} GB/s over the {name} ({limit:.0f} GB/s); NCCL a2a time over "
             "ours:", "", "| workload | dispatch x limit | combine x limit | dispatch x NCCL | "
             "combine x NCCL |", "|---|---|---|---|---|"]
    for w in report["workloads"]:
        lines.append(
            f"| {w['name']} | {w[f'dispatch_{rate}_GBps'] / limit:.2f} | "
            f"{w[f'combine_{rate}_GBps'] / limit:.2f} | "
            f"{w.get('nccl_dispatch_us', float('nan')) / w['dispatch_us']:.2f} | "
            f"{w.get('nccl_combine_us', float('nan')) / w['combine_us']:.2f} |")
    return lines


def _copy_ratio_lines(report: dict) -> list[str]:
    """Each workload against every rank copying the same bytes at once (d2d, in this run, with
    the SMs each rank has): copy time over ours; >= 1 means faster than the copy."""
    lines = ["", "Against the same-run copy (every rank copies the bytes it receives, d2d, all "
             "at once; copy time over ours):", "",
             "| workload | dispatch us | copy us | dispatch x copy | combine us | copy us | "
             "combine x copy |", "|---|---|---|---|---|---|---|"]
    for w in report["workloads"]:
        if "dispatch_copy_us" not in w:
            continue
        lines.append(
            f"| {w['name']} | {w['dispatch_us']:.1f} | {w['dispatch_copy_us']:.1f} | "
            f"{w['dispatch_copy_us'] / w['dispatch_us']:.2f} | {w['combine_us']:.1f} | "
            f"{w['combine_copy_us']:.1f} | {w['combine_copy_us'] / w['combine_us']:.2f} |")
    return lines


def _plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    sw = report["sm_sweep"]
    # One rank moves nothing over NVLink: plot the local permute against the d2d copy instead.
    kind = "nvlink" if report["ranks"] > 1 else "logical"
    if sw:
        a.plot([w["num_sms"] for w in sw], [w[f"dispatch_{kind}_GBps"] for w in sw], "o-",
               label="dispatch (FP8)")
        a.plot([w["num_sms"] for w in sw], [w[f"combine_{kind}_GBps"] for w in sw], "s-",
               label="combine (BF16)")
    if kind == "nvlink":
        both = report["limits"].get("peer_both_ways_GBps")
        if both:
            a.axhline(both, color="gray", ls="--", label="copy engine, both ways")
    else:
        d2d = report["limits"].get("d2d_copy_GBps")
        if d2d:  # read + write; the logical rate counts each byte once
            a.axhline(d2d / 2, color="gray", ls="--", label="d2d copy (bytes counted once)")
    a.set_xlabel("SMs")
    a.set_ylabel("NVLink GB/s per rank" if kind == "nvlink" else "logical GB/s (local permute)")
    a.set_title("Bandwidth vs SMs")
    a.legend()
    ts = report["token_sweep"]
    b.loglog([w["T"] for w in ts], [w["dispatch_us"] for w in ts], "o-", label="dispatch")
    b.loglog([w["T"] for w in ts], [w["combine_us"] for w in ts], "s-", label="combine")
    b.loglog([w["T"] for w in ts], [w.get("nccl_dispatch_us", float("nan")) for w in ts],
             "o--", label="NCCL a2a dispatch")
    b.loglog([w["T"] for w in ts], [w.get("nccl_combine_us", float("nan")) for w in ts],
             "s--", label="NCCL a2a combine")
    b.set_xlabel("tokens per rank")
    b.set_ylabel("us")
    b.set_title("Latency vs tokens")
    b.legend()
    fig.suptitle(f"deep_ep_ops EP{report['ranks']} ({report['ranks_per_gpu']} per GPU) on "
                 f"{report['kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    def extra(parser):
        parser.add_argument("--no-sweeps", dest="sweeps", action="store_false",
                            help="skip the SM and token sweeps")
        parser.add_argument("--direct-outputs", type=int, default=0, metavar="N",
                            help="also run each prefill workload on a Buffer with N "
                                 "direct-output slots (R >= 2)")
        parser.add_argument("--no-line-up", dest="line_up", action="store_false",
                            help="time samples without lining the ranks up on the GPU first "
                                 "(the method of the earlier results, for comparisons)")
        parser.add_argument("--zero-copy-combine", action="store_true",
                            help="also run each prefill workload with combine's input in a "
                                 "combine-input slot (R >= 2; with --direct-outputs: together)")
    args = report_io.parse_args(__doc__.splitlines()[0], extra)
    if args.ranks_per_gpu == 1:  # the links between GPUs; ranks sharing a GPU have none
        limits = baselines.copy_engine_limits(64 << 20 if args.quick else 256 << 20)
    else:
        limits = {}
    results = spawn(_rank_main, args.ranks, args, backend="nccl",
                    ranks_per_gpu=args.ranks_per_gpu, timeout_s=3600, what="bench_ep")[0]
    report = {"kind": args.kind, "date": report_io.today(), "ranks": args.ranks,
              "ranks_per_gpu": args.ranks_per_gpu, "limits": limits,
              "peers": baselines.optional_peers(), "torch": torch.__version__,
              "timing": f"CUDA events, median of samples of {CALLS_PER_SAMPLE} back-to-back "
                        "calls, slowest rank"
                        + ("; ranks lined up on the GPU before each sample" if args.line_up
                           else "; ranks not lined up (a sample's first call absorbs their "
                                "start skew)")
                        + "; decode: CUDA-graph replay",
              **results}
    stem = report_io.save(report, args, "", _markdown)
    if report["sm_sweep"] or report["token_sweep"]:
        _plot(report, stem + ".png")


if __name__ == "__main__":
    main()
