"""Host (CPU) time per eager dispatch / combine call on ONE GPU (R = 1), GPU work excluded.

    python3 tests/gpu/host_overhead.py [--tokens 4096 --hidden 7168 --topk 8 --experts 256]

The GPU is kept busy by a long sleep kernel queued first, so no call waits for the device and
the time from call to return is pure host work (Python + dispatcher + C++ + launches). Each
layer of the call stack is timed on its own, so the differences split the cost:

  torch.ops.deep_ep.dispatch      public op: composite dispatch (C++) -> _dispatch_static
  torch.ops.deep_ep._dispatch_static   dispatcher + autograd kernel (C++, AutogradCUDA:
                                  csrc/torch/ep_autograd.cpp) + C++ CUDA kernel
  [grad] torch.ops.deep_ep.*      the public op with topk_weights / x requiring grad: the
                                  autograd node is built (the training path)
  ... below autograd              dispatcher + C++ CUDA kernel (registry, checks, launches;
                                  csrc/torch/ep_kernels.cpp), the autograd key skipped
  cuda.ep.dispatch                pybind11 + the C++ entry (allocations, launches), no checks

and, for reference (not on the eager path since the kernels are registered in C++):
  the Python kernel               registry lookup, validation.py, backend call (ops._KERNELS)

then a torch.profiler trace (CPU + CUDA runtime calls) of the public ops lists what one call
does: runtime API calls (launches, attribute calls) and dispatcher ops, with counts per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.timing import hold_gpu  # noqa: E402

SLEEP_US = 200_000.0  # GPU busy longer than any batch of calls below


def _per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean host time of `calls` back-to-back calls, issued while
    the GPU is busy with a sleep kernel (so launches never wait for the device)."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        hold_gpu(SLEEP_US)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def _below_autograd(fn):
    def call():
        with torch._C._AutoDispatchBelowAutograd():
            return fn()
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()

    from deep_ep_ops.local_ranks import init_single_rank_group
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    init_single_rank_group("nccl", device_id=dev)
    import deep_ep_ops
    from deep_ep_ops import ops as ops_py
    from deep_ep_ops.cuda import ep

    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    buf = deep_ep_ops.Buffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                             num_experts=E, fp8_dispatch=True)
    name = buf.group_name
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(T, H, device=dev, generator=g) * 4).to(torch.float8_e4m3fn)
    s = torch.rand(T, (H + 127) // 128, device=dev, generator=g) + 0.5
    idx = torch.rand(T, E, device=dev, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, device=dev, generator=g)
    out = torch.ops.deep_ep.dispatch(x, s, idx, w, name, E, 1, False, False, 0)
    handle = out[5]
    y = out[0].to(torch.bfloat16)
    w_rg = w.clone().requires_grad_()
    y_rg = y.clone().requires_grad_()
    torch.cuda.synchronize()

    layers = {
        "dispatch": [
            ("torch.ops.deep_ep.dispatch",
             lambda: torch.ops.deep_ep.dispatch(x, s, idx, w, name, E, 1, False, False, 0)),
            ("torch.ops.deep_ep._dispatch_static",
             lambda: torch.ops.deep_ep._dispatch_static(x, s, idx, w, name, E, 1, False, 0)),
            ("  ... below autograd (C++ kernel)",
             _below_autograd(lambda: torch.ops.deep_ep._dispatch_static(
                 x, s, idx, w, name, E, 1, False, 0))),
            ("[grad] torch.ops.deep_ep.dispatch",
             lambda: torch.ops.deep_ep.dispatch(x, s, idx, w_rg, name, E, 1, False, False, 0)),
            ("cuda.ep.dispatch (pybind + C++)",
             lambda: ep.dispatch(buf, x, s, idx, w, E, 1, False, 0)),
            ("[ref] the Python kernel of _dispatch_static",
             lambda: ops_py._KERNELS["_dispatch_static"](x, s, idx, w, name, E, 1, False, 0)),
        ],
        "combine": [
            ("torch.ops.deep_ep.combine",
             lambda: torch.ops.deep_ep.combine(y, handle, None, name, 0)),
            ("  ... below autograd (C++ kernel)",
             _below_autograd(lambda: torch.ops.deep_ep.combine(y, handle, None, name, 0))),
            ("[grad] torch.ops.deep_ep.combine",
             lambda: torch.ops.deep_ep.combine(y_rg, handle, None, name, 0)),
            ("cuda.ep.combine (pybind + C++)",
             lambda: ep.combine(buf, y, handle, None, 0)),
            ("[ref] the Python kernel of combine",
             lambda: ops_py._KERNELS["combine"](y, handle, None, name, 0)),
        ],
    }
    for op in ("dispatch", "_dispatch_static", "combine"):
        dump = torch._C._dispatch_dump(f"deep_ep::{op}").splitlines()
        kern = [ln for ln in dump
                if ln.startswith(("CUDA:", "AutogradCUDA:", "CompositeImplicitAutograd"))]
        print(f"deep_ep::{op}: " + "; ".join(k.split(" :: ")[0] for k in kern))
    print(f"R=1 T={T} H={H} K={K} E={E} FP8 dispatch / BF16 combine on "
          f"{torch.cuda.get_device_name(dev)}; host us per call (median of {args.repeats} x "
          f"{args.calls} calls, GPU busy)")
    for op, rows in layers.items():
        for mode in ("grad mode", "inference_mode"):
            ctx = torch.inference_mode() if mode == "inference_mode" else torch.enable_grad()
            with ctx:
                times = [(label, _per_call_us(fn, args.calls, args.repeats)) for label, fn in rows]
            print(f"\n{op} ({mode})")
            prev = None
            for label, us in times:
                side = label.startswith("[")  # [ref] / [grad]: not a layer of the stack
                delta = "" if prev is None or side else f"   (layer above adds {prev - us:6.1f})"
                print(f"  {label:40s} {us:7.1f} us{delta}")
                if not side:
                    prev = us

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile
        n = 20
        for op, fn in (("dispatch", layers["dispatch"][0][1]), ("combine", layers["combine"][0][1])):
            fn()
            torch.cuda.synchronize()
            hold_gpu(SLEEP_US)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    fn()
            torch.cuda.synchronize()
            print(f"\n{op}: host-side events over {n} calls (count / {n} = per call)")
            rows = [e for e in prof.key_averages() if e.cpu_time_total > 0 or e.count > 0]
            rows.sort(key=lambda e: -e.self_cpu_time_total)
            print(f"  {'event':50s} {'per call':>8s} {'self CPU us/call':>17s}")
            for e in rows[:30]:
                if str(getattr(e, "device_type", "")).endswith("CUDA") and e.self_cpu_time_total == 0:
                    continue  # device kernels (GPU time), not host work
                print(f"  {e.key[:50]:50s} {e.count / n:8.2f} {e.self_cpu_time_total / n:17.2f}")
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
