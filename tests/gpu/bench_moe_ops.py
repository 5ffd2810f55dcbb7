"""Latency of the CUDA dispatch / combine on all local GPUs (one process each).

    python tests/gpu/bench_moe_ops.py [--tokens 4096 --hidden 7168 --topk 8 --experts 256]

FP8 dispatch (fp32 scales per 128 channels) and BF16 combine of the received rows, both
layouts, a few num_sms values; median over iterations, CUDA events, rank 0 prints a table.
"logical GB/s" counts the bytes of every received row (local rows included), like DeepEP:
each byte once. The same run measures a device-to-device copy (torch copy_ of 256 MiB) and
reports it the same way (bytes copied, each once; bench/bench_ep.py's d2d_copy_GBps counts
read + write, i.e. twice this), so "x d2d" is the apples-to-apples ratio of issue 4 target 6.

--direct-outputs N / --zero-copy-combine: the Buffer options of the same names (R >= 2; with
the latter the compact combines take their input from ``buf.combine_input()``).

--timeline: when each phase of a compact dispatch ran on every rank, lined up on the GPU's
clock (layout kernel, push CTAs, epilogue), one call after the ranks are lined up and the last
of ten back-to-back calls.

--profile: kernel times from torch.profiler. With programmatic dependent launch on (default),
a kernel is scheduled while its predecessor runs and waits for it on the GPU, so its profiled
duration includes that wait; DEEP_EP_OPS_PDL=0 gives each kernel's own time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.timing import hold_gpu  # noqa: E402
from tests.gpu.dist_gpu import gpus, rank_device, run_gpus  # noqa: E402


def _median_us(fn, iters, gloo, reps=10):
    """Median over ``iters`` samples of the mean time of ``reps`` back-to-back calls (the
    ranks' launch skew after the host barrier is paid once per sample, not per call)."""
    times = []
    for _ in range(iters):
        dist.barrier(group=gloo)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()  # absorbs the skew
        hold_gpu()  # the timed calls are all enqueued before the GPU reaches them
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def _d2d_once_GBps(dev, nbytes=256 << 20, iters=10):
    """Device-to-device copy bandwidth, bytes copied counted once (CUDA events, median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


# DispatchScratch::kernel_times order (ep_launch.hpp's KernelStamp), then the push CTAs' stamps:
# start, free to start on rows (the compact bases or the PDL wait), last warp done with its
# tokens, after the barrier (dispatch.cu)
_KERNEL_STAMPS = ("layout start", "layout last CTA", "layout end", "epilogue start", "epilogue end",
                  "count started (last block)", "count loaded (last block)", "count stored (last block)")
_PUSH_STAMPS = ("start", "waited", "rows done", "barrier done")


def _push_ctas(raw: list[int]) -> list[list[int]]:
    """The push CTAs' stamps (ns, the GPU's clock) of a ``dispatch_timeline`` row."""
    k, n = len(_KERNEL_STAMPS), len(_PUSH_STAMPS)
    return [raw[i:i + n] for i in range(k, len(raw), n)]


def _spread(values) -> tuple:
    """(first, median, last) of ``values``."""
    v = sorted(values)
    return v[0], v[len(v) // 2], v[-1]


def push_phases(raw: list[int]) -> str:
    """One line from the last push kernel's per-CTA stamps, in us from its first CTA's start."""
    ctas = _push_ctas(raw)
    if not ctas:
        return "push kernel: no stamps (one rank)"
    first = min(c[0] for c in ctas)
    cols = ", ".join(
        name + " " + "/".join(f"{(t - first) / 1e3:.1f}" for t in _spread(c[j] for c in ctas))
        for j, name in enumerate(_PUSH_STAMPS))
    return (f"push kernel, {len(ctas)} CTAs, us from its first CTA's start (min/median/max "
            f"over CTAs): {cols}")


def _timeline_row(raw: list[int]) -> dict:
    """One rank's dispatch timeline from ``dispatch_timeline``: absolute ns per phase."""
    ctas = _push_ctas(raw)
    row = dict(zip(_KERNEL_STAMPS, raw[:len(_KERNEL_STAMPS)]))
    for j, name in enumerate(_PUSH_STAMPS):
        for which, t in zip(("first", "median", "last"), _spread(c[j] for c in ctas)):
            row[f"push {name} ({which})"] = t
    return row


def dispatch_timeline(disp, buf, gloo, rank, world, iters, back_to_back):
    """Median over ``iters`` lined-up samples of when each phase of a dispatch happened on
    each rank, in us from the earliest layout start over the ranks (the GPU's global clock is
    shared by ranks on one GPU). ``back_to_back``: the stamps of the last of that many calls."""
    from bench.bench_ep import gpu_line_up
    from deep_ep_ops.cuda import extension
    line_up = gpu_line_up(buf)
    samples = []
    for _ in range(iters):
        dist.barrier(group=gloo)
        torch.cuda.synchronize()
        hold_gpu()
        line_up()
        for _ in range(back_to_back):
            disp()
        torch.cuda.synchronize()
        mine = _timeline_row(extension.module().dispatch_timeline(buf.ep_state))
        # the layout's last CTA: its phases in ns from its start (layout.cu's recv_info stamps)
        ts = extension.module().layout_times(buf.ep_state)
        for name, v in zip(("counted", "published", "peer rows in", "offsets"), ts):
            mine["layout " + name] = mine["layout last CTA"] + v
        rows = [None] * world
        dist.all_gather_object(rows, mine, group=gloo)
        t0 = min(r["layout start"] for r in rows)
        # (a stamp of 0: that phase did not run, e.g. no epilogue when the routing outputs sit
        # in a direct-output slot)
        samples.append([{n: (v - t0) / 1e3 if v else float("nan") for n, v in r.items()}
                        for r in rows])
    if rank == 0:
        print(f"dispatch timeline, last of {back_to_back} lined-up call(s), median of {iters}, "
              f"us from the earliest layout start:")
        print("phase".ljust(30) + "".join(f"rank {r}".rjust(10) for r in range(world)))
        for name in samples[0][0]:
            med = [sorted(s[r][name] for s in samples)[iters // 2] for r in range(world)]
            print(name.ljust(30) + "".join(f"{m:10.1f}" for m in med))


def _body(rank, world, gloo, args):
    import deep_ep_ops
    dev = rank_device()
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                             num_experts=E, fp8_dispatch=True,
                             direct_outputs=args.direct_outputs if world > 1 else 0,
                             zero_copy_combine=args.zero_copy_combine and world > 1)

    def combine_x(out, expand):
        # the peers read this rank's rows in place: compact, no weights, x in a slot (filled
        # once; every timed combine reads the same slot, as bench_ep does)
        recv = out[0].to(torch.bfloat16)
        if buf.zero_copy_combine and not expand:
            return buf.combine_input(recv.shape[0]).copy_(recv)
        return recv

    def comb(recv, handle, cw, num_sms):
        return torch.ops.deep_ep.combine(recv, handle, cw, buf.group_name, num_sms)
    g = torch.Generator(device=dev).manual_seed(rank)
    x = (torch.randn(T, H, device=dev, generator=g) * 4).to(torch.float8_e4m3fn)
    s = torch.rand(T, (H + 127) // 128, device=dev, generator=g) + 0.5
    idx = torch.rand(T, E, device=dev, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, device=dev, generator=g)
    d2d = _d2d_once_GBps(dev)
    rows = []
    for expand in () if args.timeline_only else (False, True):
        for num_sms in args.num_sms:
            def disp():
                return torch.ops.deep_ep.dispatch(x, s, idx, w, buf.group_name, E, 1, expand,
                                                  False, num_sms)
            out = disp()
            recv = combine_x(out, expand)
            cw = out[3] if expand else None
            valid = int(out[5][0, 0])
            for _ in range(3):
                disp()
                comb(recv, out[5], cw, num_sms)
            t_d = _median_us(disp, args.iters, gloo)
            t_c = _median_us(lambda: comb(recv, out[5], cw, num_sms), args.iters, gloo)
            groups = int(out[5][0, 1])
            d_bytes = groups * (H + s.shape[1] * 4)
            c_bytes = groups * H * 2
            rows.append((expand, num_sms, valid, t_d, d_bytes / t_d / 1e3, t_c,
                         c_bytes / t_c / 1e3, d2d))
    if args.timeline and world > 1:
        for num_sms in args.num_sms:
            def disp():
                return torch.ops.deep_ep.dispatch(x, s, idx, w, buf.group_name, E, 1, False,
                                                  False, num_sms)
            if rank == 0:
                print(f"compact layout, num_sms {num_sms}")
            for reps in (1, 10):
                dispatch_timeline(disp, buf, gloo, rank, world, args.iters, reps)
        if args.timeline_only:
            buf.destroy()
            return
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for expand in (False, True):
            out = torch.ops.deep_ep.dispatch(x, s, idx, w, buf.group_name, E, 1, expand, False, 0)
            recv = combine_x(out, expand)
            cw = out[3] if expand else None
            dist.barrier(group=gloo)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    torch.ops.deep_ep.dispatch(x, s, idx, w, buf.group_name, E, 1, expand, False, 0)
                for _ in range(10):
                    comb(recv, out[5], cw, 0)
                torch.cuda.synchronize()
            if rank == 0:
                pdl = os.environ.get("DEEP_EP_OPS_PDL", "1") != "0"
                print(f"{'expand' if expand else 'compact'} layout, 10 dispatches + 10 combines"
                      f" (PDL {'on: times include the wait for the previous kernel' if pdl else 'off'})")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            from deep_ep_ops.cuda import extension
            ts = extension.module().layout_times(buf.ep_state)
            if world == 1 and not expand:  # the one-kernel dispatch (local_dispatch.cu)
                print(f"rank {rank} one-rank dispatch, last tile to add its histogram "
                      f"(tile {ts[4]}), us from its start: counted {ts[0]/1e3:.1f}, scanned "
                      f"{ts[1]/1e3:.1f}, copied {ts[2]/1e3:.1f}, end {ts[3]/1e3:.1f}", flush=True)
            else:
                print(f"rank {rank} layout kernel phases (us from start): counted {ts[0]/1e3:.1f}, "
                      f"published {ts[1]/1e3:.1f}, barrier done {ts[2]/1e3:.1f}, offsets "
                      f"{ts[3]/1e3:.1f}, end {ts[4]/1e3:.1f}", flush=True)
                stamps = extension.module().dispatch_timeline(buf.ep_state)
                print(f"rank {rank} {push_phases(stamps)}", flush=True)
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows, group=gloo)
    if rank == 0:
        print(f"\nEP{world} T={T} H={H} K={K} E={E} FP8 dispatch / BF16 combine "
              f"({torch.cuda.get_device_name(dev)}); per rank: median us, logical GB/s")
        d2d0 = all_rows[0][0][7] if all_rows[0] else float("nan")
        print(f"d2d copy (rank 0, 256 MiB, bytes counted once): {d2d0:.0f} GB/s "
              f"(= {2 * d2d0:.0f} GB/s read+write as bench_ep's d2d_copy_GBps); "
              f"x d2d = logical GB/s / {d2d0:.0f}")
        print("layout  num_sms  rows(r0)  " + "  ".join(
            f"disp_us[r{r}] GB/s  comb_us[r{r}] GB/s" for r in range(world)))
        for i, r0 in enumerate(all_rows[0]):
            cols = "  ".join(f"{all_rows[r][i][3]:10.1f} {all_rows[r][i][4]:5.0f}"
                             f"  {all_rows[r][i][5]:10.1f} {all_rows[r][i][6]:5.0f}"
                             for r in range(world))
            print(f"{'expand' if r0[0] else 'compact':7s} {r0[1]:7d}  {r0[2]:8d}  {cols}"
                  f"   x d2d (r0): disp {r0[4] / r0[7]:.2f} comb {r0[6] / r0[7]:.2f}")
    buf.destroy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--num-sms", type=int, nargs="+", default=[0, 16, 64])
    p.add_argument("--world", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="kernel times (torch.profiler)")
    p.add_argument("--timeline", action="store_true",
                   help="when each dispatch phase ran on each rank (R >= 2, compact layout)")
    p.add_argument("--timeline-only", action="store_true", help="--timeline, nothing else")
    p.add_argument("--direct-outputs", type=int, default=0, metavar="N",
                   help="Buffer(direct_outputs=N) (R >= 2)")
    p.add_argument("--zero-copy-combine", action="store_true",
                   help="Buffer(zero_copy_combine=True); compact combines read in place (R >= 2)")
    args = p.parse_args()
    args.timeline = args.timeline or args.timeline_only
    run_gpus(_body, args.world or gpus(), args)


if __name__ == "__main__":
    main()
