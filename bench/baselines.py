"""Baselines measured in the same run as deep_ep_ops: the copy-engine limits of the links, and
an NCCL all_to_all_single MoE dispatcher (permute -> all_to_all -> ... -> all_to_all ->
unpermute), the way frameworks without a dedicated EP library do it."""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist


def _time_copies(pairs: list[tuple[torch.Tensor, torch.Tensor]], iters: int = 20) -> float:
    """Median seconds to run every (dst, src) copy at once, each on its own stream of the
    source GPU. Each copy is timed by CUDA events on its own stream (events cannot span
    devices); a sample is the longest copy of the round. Host timing would add the launch and
    synchronisation cost (~25 us on a ~190 us copy: a 13 % too slow baseline)."""
    devices = range(torch.cuda.device_count())
    streams = [torch.cuda.Stream(device=src.device) for _, src in pairs]
    times = []
    for it in range(iters + 3):
        for d in devices:
            torch.cuda.synchronize(d)
        events = []
        for (dst, src), stream in zip(pairs, streams):
            with torch.cuda.stream(stream):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
            events.append((start, end))
        for d in devices:
            torch.cuda.synchronize(d)
        if it >= 3:
            times.append(max(s.elapsed_time(e) for s, e in events) * 1e-3)
    return statistics.median(times)


def copy_engine_limits(num_bytes: int = 256 << 20) -> dict:
    """GB/s (1e9 B/s, bytes moved once) of: a device-to-device copy on GPU 0 (counting bytes
    read plus written, as memory bandwidth is quoted); GPU 0 -> GPU 1 alone; both ways at
    once (per direction); and every GPU to every other at once (per GPU outgoing)."""
    n = torch.cuda.device_count()
    out: dict = {"num_gpus": n, "bytes_per_copy": num_bytes}
    src0 = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device="cuda:0")
    dst0 = torch.empty_like(src0)
    out["d2d_copy_GBps"] = 2 * num_bytes / _time_copies([(dst0, src0)]) / 1e9
    if n < 2:
        return out
    bufs = {}
    for a in range(n):
        for b in range(n):
            if a != b:
                bufs[(a, b)] = (torch.empty(num_bytes, dtype=torch.uint8, device=f"cuda:{b}"),
                                torch.randint(0, 255, (num_bytes,), dtype=torch.uint8,
                                              device=f"cuda:{a}"))
    out["peer_one_way_GBps"] = num_bytes / _time_copies([bufs[(0, 1)]]) / 1e9
    out["peer_both_ways_GBps"] = num_bytes / _time_copies([bufs[(0, 1)], bufs[(1, 0)]]) / 1e9
    every = list(bufs.values())
    out["peer_all_to_all_GBps_per_gpu"] = (n - 1) * num_bytes / _time_copies(every) / 1e9
    return out


class NcclDispatcher:
    """MoE token exchange with torch.distributed.all_to_all_single.

    ``plan`` (host sync: the split sizes) happens once per routing, outside the timed region,
    which favours the baseline; ``plan_us`` reports its cost separately.
    """

    def __init__(self, topk_idx: torch.Tensor, num_experts: int, group=None) -> None:
        self.group = group
        R = dist.get_world_size(group)
        E_loc = num_experts // R
        T = topk_idx.shape[0]
        ranks = torch.where(topk_idx >= 0, topk_idx // E_loc, -1)
        one_hot = torch.nn.functional.one_hot(ranks.clamp(min=0), R).bool()
        sends = (one_hot & (ranks >= 0)[..., None]).any(1)  # [T, R]
        # token order grouped by destination rank: what index_select gathers
        dst_of_pair, tok_of_pair = sends.t().nonzero(as_tuple=True)
        self.send_order = tok_of_pair
        in_splits = sends.sum(0)
        out_splits = torch.empty_like(in_splits)
        dist.all_to_all_single(out_splits, in_splits, group=group)
        self.in_splits = in_splits.tolist()
        self.out_splits = out_splits.tolist()
        self.num_recv = sum(self.out_splits)
        self.num_tokens = T

    def dispatch(self, rows: torch.Tensor) -> torch.Tensor:
        send = rows.index_select(0, self.send_order)
        recv = rows.new_empty((self.num_recv, *rows.shape[1:]))
        dist.all_to_all_single(recv, send, self.out_splits, self.in_splits, group=self.group)
        return recv

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        back = rows.new_empty((self.send_order.numel(), *rows.shape[1:]))
        dist.all_to_all_single(back, rows, self.in_splits, self.out_splits, group=self.group)
        out = torch.zeros((self.num_tokens, *rows.shape[1:]), dtype=torch.float32,
                          device=rows.device)
        out.index_add_(0, self.send_order, back.float())
        return out.to(rows.dtype)


def optional_peers() -> dict:
    """Other EP libraries, when they import here; a reason otherwise."""
    found = {}
    try:
        import deep_ep  # noqa: F401
        found["deep_ep"] = "importable (not wired into this harness yet)"
    except Exception as exc:  # noqa: BLE001 - any import failure means absent
        found["deep_ep"] = f"absent: {type(exc).__name__}: {exc}"[:200]
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
        found["symm_mem.all_to_all_vdev_2d"] = "absent: needs the NVSHMEM backend, not set up"
    except Exception as exc:  # noqa: BLE001
        found["symm_mem.all_to_all_vdev_2d"] = f"absent: {exc}"[:200]
    return found
