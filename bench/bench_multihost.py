"""Bytes on the wire between hosts: the multi-host CPU reference's inter-host stage, counted.

    python -m bench.bench_multihost [--tokens 64] [--hidden 256] [--topk 4] [--experts 64]
                                    [--topologies 2x2,4x2,2x4] [--out bench/results]

FUNCTIONAL, NOT A SPEED MEASUREMENT: every rank is a CPU process on this machine (gloo), hosts
are simulated with ``Buffer(ranks_per_host=L)``; what is measured is what the inter-host stage
(``deep_ep_ops.cpu.interhost``) sends between hosts, per (source host, destination host),
recorded by its WireLog. Per host pair it reports, for one dispatch and one combine:

* ``exact``: rows and payload bytes sent by ``dispatch(exact=True)`` (counts first, then the
  rows) and by the combine of its handle (fp32 partials);
* ``static``: the same for ``exact=False`` (M rows per (source rank, destination host));
* ``minimum``: the deduplicated minimum, one row per (token, destination host != own);
* ``naive``: what sending each token once per destination RANK (the single-host algorithm
  stretched over hosts) would put across.

Workload: T tokens per rank, bf16 rows of H, uniform random top-K of E experts (seeded).
Writes ``multihost-wire-<date>.md`` and ``.json``; the exact rows must equal the minimum
(the run fails otherwise).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

import deep_ep_ops
from deep_ep_ops.cpu.interhost import wire_log
from deep_ep_ops.local_ranks import spawn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _inputs(rank: int, T: int, H: int, E: int, K: int):
    g = torch.Generator().manual_seed(4321 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    idx = torch.rand(T, E, generator=g).topk(K, dim=-1).indices  # uniform random top-k
    return x, idx, torch.rand(T, K, generator=g)


def _counts(idx: torch.Tensor, E: int, R: int, L: int) -> tuple[dict, dict]:
    """(minimum, naive) rows this rank's tokens need to each other host."""
    N = R // L
    ranks = idx.div(E // R, rounding_mode="floor")  # [T, K]
    hosts = ranks.div(L, rounding_mode="floor")
    minimum, naive = {}, {}
    for dst in range(N):
        minimum[dst] = int((hosts == dst).any(-1).sum())
        on = torch.zeros(idx.shape[0], R, dtype=torch.bool)
        on.scatter_(1, ranks, True)
        naive[dst] = int(on[:, dst * L:(dst + 1) * L].sum())
    return minimum, naive


def _rank(rank: int, R: int, L: int, T: int, H: int, E: int, K: int) -> dict:
    buf = deep_ep_ops.Buffer(num_max_tokens_per_rank=T, hidden=H, num_topk=K, num_experts=E,
                             ranks_per_host=L)
    x, idx, w = _inputs(rank, T, H, E, K)
    log = wire_log(buf)
    out: dict = {}
    for mode in ("static", "exact"):
        log.clear()
        recv = torch.ops.deep_ep.dispatch(x, None, idx, w, buf.group_name, E, 1, False,
                                          mode == "exact")
        torch.ops.deep_ep.combine(recv[0], recv[5], None, buf.group_name)
        out[mode] = {}
        for op, kind, what in (("dispatch", "rows", "rows"), ("dispatch", "rows", "bytes"),
                               ("dispatch", "counts", "bytes"), ("combine", "partials", "rows"),
                               ("combine", "partials", "bytes")):
            totals = log.totals(op, kind, what)
            out[mode][f"{op} {kind} {what}"] = {f"{a}->{b}": v for (a, b), v in totals.items()}
    minimum, naive = _counts(idx, E, R, L)
    h = rank // L
    out["minimum"] = {f"{h}->{d}": n for d, n in minimum.items() if d != h}
    out["naive"] = {f"{h}->{d}": n for d, n in naive.items() if d != h}
    buf.destroy()
    return out


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def run_topology(N: int, L: int, T: int, H: int, E: int, K: int) -> dict:
    """Per host pair totals over all ranks of an N x L run."""
    per_rank = spawn(_rank, N * L, L, T, H, E, K, backend="gloo",
                     what="multi-host wire bench")
    pairs = [f"{a}->{b}" for a in range(N) for b in range(N) if a != b]
    agg: dict = {"static": {}, "exact": {}, "minimum": {}, "naive": {}}
    for r in per_rank:
        for mode in ("static", "exact"):
            for kind, vals in r[mode].items():
                _add(agg[mode].setdefault(kind, {}), vals)
        _add(agg["minimum"], r["minimum"])
        _add(agg["naive"], r["naive"])
    row_bytes = H * 2 + K * 8 + K * 4  # bf16 row, int64 expert ids, fp32 weights
    table = []
    for p in pairs:
        ex, st = agg["exact"], agg["static"]
        table.append(dict(
            pair=p, minimum_rows=agg["minimum"].get(p, 0), naive_rows=agg["naive"].get(p, 0),
            exact_rows=ex["dispatch rows rows"].get(p, 0),
            static_rows=st["dispatch rows rows"].get(p, 0),
            exact_bytes=ex["dispatch rows bytes"].get(p, 0),
            exact_count_bytes=ex["dispatch counts bytes"].get(p, 0),
            static_bytes=st["dispatch rows bytes"].get(p, 0),
            minimum_bytes=agg["minimum"].get(p, 0) * row_bytes,
            naive_bytes=agg["naive"].get(p, 0) * row_bytes,
            combine_exact_rows=ex["combine partials rows"].get(p, 0),
            combine_exact_bytes=ex["combine partials bytes"].get(p, 0),
            combine_static_bytes=st["combine partials bytes"].get(p, 0)))
    bad = [t["pair"] for t in table if t["exact_rows"] != t["minimum_rows"]]
    if bad:
        raise AssertionError(f"exact rows differ from the deduplicated minimum on {bad}")
    return dict(hosts=N, ranks_per_host=L, row_bytes=row_bytes, pairs=table)


def _markdown(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"# Multi-host wire bytes ({report['date']})", "",
        "**Functional count, not a speed measurement**: CPU ranks (gloo) on one machine, hosts "
        "simulated with `Buffer(ranks_per_host=L)`; the inter-host stage's WireLog counts what "
        "crosses between hosts. `python -m bench.bench_multihost`.", "",
        f"Workload: T = {w['tokens']} tokens per rank, H = {w['hidden']} (bf16), "
        f"K = {w['topk']}, E = {w['experts']}, uniform random top-K. A dispatch row is "
        "H·2 + K·8 + K·4 bytes (row, int64 expert ids, fp32 weights); a combine row is an "
        "fp32 partial (H·4 bytes). minimum = one row per (token, destination host ≠ own); "
        "naive = one row per (token, destination rank on another host); static = M rows per "
        "(source rank, destination host); exact counts exclude the 8-byte count messages "
        "(listed apart). Combine columns: the fp32 partials the pair's first host sends back "
        "to the second (one per row the second host sent it in exact mode).", "",
    ]
    for topo in report["topologies"]:
        lines += [f"## {topo['hosts']} hosts × {topo['ranks_per_host']} ranks", "",
                  "| host pair | minimum rows | exact rows | naive rows | static rows | "
                  "exact / minimum bytes | naive bytes | static bytes | count bytes | "
                  "combine exact rows | combine exact / static bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in topo["pairs"]:
            lines.append(
                f"| {t['pair']} | {t['minimum_rows']} | {t['exact_rows']} | {t['naive_rows']} "
                f"| {t['static_rows']} | {t['exact_bytes']:,} / {t['minimum_bytes']:,} | "
                f"{t['naive_bytes']:,} | {t['static_bytes']:,} | {t['exact_count_bytes']} | "
                f"{t['combine_exact_rows']} | {t['combine_exact_bytes']:,} / "
                f"{t['combine_static_bytes']:,} |")
        mn = sum(t["minimum_rows"] for t in topo["pairs"])
        nv = sum(t["naive_rows"] for t in topo["pairs"])
        st = sum(t["static_rows"] for t in topo["pairs"])
        lines += ["", f"Total: exact = minimum = {mn} rows; naive {nv} rows "
                  f"({nv / max(mn, 1):.2f}× the minimum); static {st} rows "
                  f"({st / max(mn, 1):.2f}×).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="T, tokens per rank (= M)")
    ap.add_argument("--hidden", type=int, default=256, help="H, row width (bf16)")
    ap.add_argument("--topk", type=int, default=4, help="K, experts per token")
    ap.add_argument("--experts", type=int, default=64, help="E, divisible by every R")
    ap.add_argument("--topologies", default="2x2,4x2,2x4",
                    help="comma-separated HOSTSxRANKS_PER_HOST")
    ap.add_argument("--out", default=RESULTS, help="folder for the .md and .json")
    args = ap.parse_args(argv)
    topologies = []
    for spec in args.topologies.split(","):
        N, L = (int(v) for v in spec.lower().split("x"))
        topologies.append(run_topology(N, L, args.tokens, args.hidden, args.experts,
                                       args.topk))
    report = dict(date=datetime.date.today().isoformat(), functional=True,
                  workload=dict(tokens=args.tokens, hidden=args.hidden, topk=args.topk,
                                experts=args.experts), topologies=topologies)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"multihost-wire-{report['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(report) + "\n")
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
