"""Multi-host cost model for expert-parallel dispatch / combine (issue 17). CPU only, stdlib only.

The design it models (being implemented): ranks are grouped into hosts of L ranks, host h holding
global ranks [hL, (h+1)L). Dispatch sends a token at most once to each other host (deduplicated
by host), over NCCL grouped ncclSend/ncclRecv, to the rail peer (same local index on the
destination host); the intra-host NVLink kernels then bring it to the ranks of that host that own
its experts. Combine mirrors it: the rows of a (token, host) are reduced inside that host on the
rail peer, one partial per (token, host) crosses the NIC back, and the source adds the host
partials in ascending host order.

Routing: uniform random top-K without replacement over E experts, E/R experts per rank (rank r
owns experts [r·E/R, (r+1)·E/R)). Every number is an expectation over that routing.

    python -m bench.cost_model [--nic-efficiency 0.9] [--nvlink-GBps 357] [--out bench/results]

writes ``cost-model.md`` and ``cost-model.json``. Units: GB = 1e9 B, MB = 1e6 B, MiB = 2**20 B.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Iterable

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

NIC_RAW_GBPS = 400e9 / 8 / 1e9  # one 400 Gb/s NIC per GPU: 50 GB/s per direction
SCALE_CHANNELS = 128  # FP8 rows carry one fp32 scale per 128 channels


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Workload:
    """The tokens each rank dispatches and the MoE shape."""
    tokens: int = 4096   # T, tokens per rank
    hidden: int = 7168   # H
    topk: int = 8        # K
    experts: int = 256   # E


@dataclass(frozen=True)
class Shape:
    """R ranks in hosts of L ranks each (R divisible by L, E divisible by R)."""
    ranks: int
    ranks_per_host: int = 8

    @property
    def hosts(self) -> int:
        return self.ranks // self.ranks_per_host

    @property
    def name(self) -> str:
        return f"EP{self.ranks}"


@dataclass(frozen=True)
class Params:
    """Machine and protocol assumptions; every one is a parameter, none is measured here."""
    nic_raw_GBps: float = NIC_RAW_GBPS
    nic_efficiency: float = 0.9  # achievable fraction of the NIC's raw rate
    # per direction, both directions busy: copy-engine figure of
    # bench/results/nvidia-h200-x2-2026-11-23.md (357.2 GB/s)
    nvlink_GBps: float = 357.0
    chunk_bytes: int = 2 << 20  # our ncclSend granularity per peer (pipelining unit)
    net_latency_us: float = 5.0  # first byte across the network, NCCL proxy included
    per_message_us: float = 1.0  # serial cost of each ncclSend/ncclRecv pair we post
    host_sync_us: float = 15.0  # exact variant: counts copied to the host before the sends
    static_rows: int | None = None  # M rows per (source rank, host) pair; None = T (worst case)

    @property
    def nic_GBps(self) -> float:
        return self.nic_raw_GBps * self.nic_efficiency


# --------------------------------------------------------------------------------------------
# Routing probabilities


def p_hit(experts: int, group: int, topk: int) -> float:
    """Probability that K distinct experts drawn uniformly from E include one of a given set
    of ``group`` experts: 1 − C(E − group, K) / C(E, K)."""
    return 1.0 - math.comb(experts - group, topk) / math.comb(experts, topk)


def expected_remote_hosts(experts: int, topk: int, hosts: int) -> float:
    """Distinct hosts other than its own that a token reaches:
    (Hn − 1)·(1 − C(E − E/Hn, K)/C(E, K))."""
    return (hosts - 1) * p_hit(experts, experts // hosts, topk)


def expected_dest_ranks(experts: int, topk: int, ranks: int) -> float:
    """Distinct ranks (itself included) that hold one of a token's experts: R·p_rank."""
    return ranks * p_hit(experts, experts // ranks, topk)


def p_single_rank_in_host(experts: int, topk: int, ranks: int, ranks_per_host: int) -> float:
    """Probability that a given host holds the token on exactly one of its ranks, given that it
    holds it at all (inclusion–exclusion over the host's other L − 1 ranks)."""
    per_rank = experts // ranks
    host = per_rank * ranks_per_host
    total = math.comb(experts, topk)
    exactly_one = ranks_per_host * (math.comb(experts - host + per_rank, topk)
                                    - math.comb(experts - host, topk)) / total
    return exactly_one / p_hit(experts, host, topk)


def monte_carlo_remote_hosts(experts: int, topk: int, hosts: int, trials: int,
                             seed: int = 0) -> float:
    """The same expectation as :func:`expected_remote_hosts`, sampled (a check on the formula).
    The token's own host is host 0 (any host gives the same answer by symmetry)."""
    rng = random.Random(seed)
    per_host = experts // hosts
    total = 0
    for _ in range(trials):
        total += len({e // per_host for e in rng.sample(range(experts), topk)} - {0})
    return total / trials


# --------------------------------------------------------------------------------------------
# Row sizes


def scale_bytes(hidden: int) -> int:
    """fp32 scale packs of an FP8 row: one per 128 channels (H/128 · 4 B)."""
    return -(-hidden // SCALE_CHANNELS) * 4


def routing_meta_bytes(topk: int) -> int:
    """What a dispatched row carries besides its data across the NIC: K expert ids (int32),
    K weights (fp32), the source token index and the source rank (int32 each)."""
    return topk * (4 + 4) + 8


def nic_dispatch_row_bytes(w: Workload) -> int:
    """FP8 row + scale packs + routing metadata: 7168 + 224 + 72 = 7464 B at H=7168, K=8."""
    return w.hidden + scale_bytes(w.hidden) + routing_meta_bytes(w.topk)


def nvlink_dispatch_row_bytes(w: Workload) -> int:
    """FP8 row + scale packs + the intra-host kernels' metadata row, align_up(4 + 3K, 4) int32
    (csrc/runtime/ops.cpp): 7168 + 224 + 112 = 7504 B at H=7168, K=8."""
    meta_ints = -(-(4 + 3 * w.topk) // 4) * 4
    return w.hidden + scale_bytes(w.hidden) + 4 * meta_ints


PARTIALS = ("bf16", "fp32", "fp32|raw")


def combine_partial_bytes(w: Workload, partial: str, p_single: float) -> float:
    """Bytes of one (token, host) partial across the NIC. ``bf16``: the host sum rounded to
    bf16 (a second rounding); ``fp32``: the host sum kept in fp32 (the contract's "rounded once");
    ``fp32|raw``: fp32 unless the host holds the token on a single rank (compact layout: a single
    row), whose raw bf16 row is sent and weighted at the source — expected size."""
    if partial == "bf16":
        return 2.0 * w.hidden
    if partial == "fp32":
        return 4.0 * w.hidden
    if partial == "fp32|raw":
        return p_single * 2.0 * w.hidden + (1.0 - p_single) * 4.0 * w.hidden
    raise ValueError(f"partial must be one of {PARTIALS}, got {partial!r}")


def deepep_dispatch_token_bytes(w: Workload) -> int:
    """Bytes per dispatched token as DeepEP V2's tests/elastic/test_ep.py counts them
    (count_bytes of recv_x with its scales, recv_topk_idx as int64, recv_topk_weights as fp32):
    7168 + 224 + 64 + 32 = 7488 B."""
    return w.hidden + scale_bytes(w.hidden) + w.topk * (8 + 4)


def deepep_combine_token_bytes(w: Workload) -> int:
    """Bytes per combined token as DeepEP V2 counts them (bf16 row + K fp32 weights): 14368 B."""
    return 2 * w.hidden + 4 * w.topk


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class OpResult:
    """One op (dispatch or combine) of one shape and variant, per rank (= per GPU)."""
    shape: str
    ranks: int
    hosts: int
    tokens: int
    op: str            # "dispatch" | "combine"
    variant: str       # "exact" | "static"
    partial: str       # combine partial ("bf16" | "fp32" | "fp32|raw"); "fp8" for dispatch
    remote_hosts_per_token: float
    dest_ranks_per_token: float
    nic_row_bytes: float
    nic_bytes_per_token: float        # leaving the token's host (= per GPU per own token)
    host_pair_bytes_per_token: float  # one source host -> one other host, per source token
    nic_MB_per_gpu: float
    nic_MB_per_host: float
    nvlink_rows_per_token: float
    nvlink_row_bytes: float
    nvlink_MB_per_gpu: float
    messages_per_rank: int            # ncclSend calls (as many ncclRecv), count phase included
    t_nic_bw_us: float
    t_nvlink_us: float
    t_latency_us: float
    t_nic_bound_us: float             # latency + NIC bytes only
    t_overlap_us: float               # latency + max(NIC, NVLink) + pipeline fill
    t_serial_us: float                # latency + NIC + NVLink
    deepep_logical_MB_per_gpu: float  # DeepEP's "RDMA" bytes for the same tokens
    eq_GBps_nic_bound: float
    eq_GBps_overlap: float
    eq_GBps_serial: float
    nic_GBps_overlap: float           # our NIC bytes / overlapped time


def model_op(shape: Shape, w: Workload, p: Params, op: str, variant: str,
             partial: str = "bf16") -> OpResult:
    """Expected bytes, messages and time of one op per rank (see the module docstring)."""
    if op not in ("dispatch", "combine"):
        raise ValueError(f"op must be dispatch or combine, got {op!r}")
    if variant not in ("exact", "static"):
        raise ValueError(f"variant must be exact or static, got {variant!r}")
    R, L, Hn, T, E, K = shape.ranks, shape.ranks_per_host, shape.hosts, w.tokens, w.experts, w.topk
    if R % L or E % R:
        raise ValueError(f"R={R} must be a multiple of L={L} and divide E={E}")
    p_host = p_hit(E, E // Hn, K)
    p_rank = p_hit(E, E // R, K)
    remote_hosts = (Hn - 1) * p_host
    M = T if p.static_rows is None else p.static_rows

    if op == "dispatch":
        row = float(nic_dispatch_row_bytes(w))
        static_row = row
        nvl_row = float(nvlink_dispatch_row_bytes(w))
        deepep_token = deepep_dispatch_token_bytes(w)
        partial = "fp8"
    else:
        p_single = p_single_rank_in_host(E, K, R, L)
        row = combine_partial_bytes(w, partial, p_single)
        # a static buffer reserves the largest row of the variant
        static_row = 2.0 * w.hidden if partial == "bf16" else 4.0 * w.hidden
        nvl_row = 2.0 * w.hidden  # owners push their raw bf16 rows (compact layout)
        deepep_token = deepep_combine_token_bytes(w)

    # NIC: per source token, one row to each remote host it reaches (exact), or M rows per
    # (rank, remote host) whatever the routing (static).
    if variant == "exact":
        pair_bytes_per_token = p_host * row
        bytes_per_peer = T * p_host * row
    else:
        pair_bytes_per_token = M * static_row / T
        bytes_per_peer = M * static_row
    nic_bytes_per_token = (Hn - 1) * pair_bytes_per_token
    nic_bytes_gpu = T * nic_bytes_per_token

    # NVLink: the token's own host (first hop, source -> owners) and each remote host (second
    # hop, rail peer -> owners); the rank doing the pushing is excluded either way. Padding rows
    # of the static variant are not forwarded.
    nvl_rows_per_token = Hn * (L - 1) * p_rank
    nvl_bytes_gpu = T * nvl_rows_per_token * nvl_row

    chunks_per_peer = math.ceil(bytes_per_peer / p.chunk_bytes) if bytes_per_peer > 0 else 0
    messages = (Hn - 1) * chunks_per_peer
    latency = p.net_latency_us + messages * p.per_message_us
    if op == "dispatch" and variant == "exact":
        # counts first: one small message per peer, then the host learns the sizes
        messages += Hn - 1
        latency += p.net_latency_us + (Hn - 1) * p.per_message_us + p.host_sync_us

    t_nic = nic_bytes_gpu / (p.nic_GBps * 1e3)  # B / (GB/s) in µs: B / (GB/s · 1e3)
    t_nvl = nvl_bytes_gpu / (p.nvlink_GBps * 1e3)
    # two stages over n equal chunks: max(a, b) + min(a, b)/n
    n = max(1, messages)
    t_overlap = latency + max(t_nic, t_nvl) + min(t_nic, t_nvl) / n
    t_serial = latency + t_nic + t_nvl
    t_nic_bound = latency + t_nic

    logical = T * Hn * p_host * deepep_token  # DeepEP counts the token's own host too

    def gbps(t_us: float) -> float:
        return logical / (t_us * 1e3)

    return OpResult(
        shape=shape.name, ranks=R, hosts=Hn, tokens=T, op=op, variant=variant, partial=partial,
        remote_hosts_per_token=remote_hosts, dest_ranks_per_token=R * p_rank,
        nic_row_bytes=row, nic_bytes_per_token=nic_bytes_per_token,
        host_pair_bytes_per_token=pair_bytes_per_token, nic_MB_per_gpu=nic_bytes_gpu / 1e6,
        nic_MB_per_host=L * nic_bytes_gpu / 1e6, nvlink_rows_per_token=nvl_rows_per_token,
        nvlink_row_bytes=nvl_row, nvlink_MB_per_gpu=nvl_bytes_gpu / 1e6,
        messages_per_rank=messages, t_nic_bw_us=t_nic, t_nvlink_us=t_nvl, t_latency_us=latency,
        t_nic_bound_us=t_nic_bound, t_overlap_us=t_overlap, t_serial_us=t_serial,
        deepep_logical_MB_per_gpu=logical / 1e6, eq_GBps_nic_bound=gbps(t_nic_bound),
        eq_GBps_overlap=gbps(t_overlap), eq_GBps_serial=gbps(t_serial),
        nic_GBps_overlap=nic_bytes_gpu / (t_overlap * 1e3))


# DeepEP's published SM90 figures: README (V2), "Performance": 8K tokens per batch, hidden
# 7168, top-8, FP8 dispatch, BF16 combine, CX7 400 Gb/s; "the results are logical bandwidth ...
# 90 GB/s actually contains local rank traffic".
DEEPEP_V2 = [
    {"topo": "EP8x2", "ranks": 16, "dispatch_GBps": 90.0, "combine_GBps": 81.0, "sms": 12},
    {"topo": "EP8x4", "ranks": 32, "dispatch_GBps": 61.0, "combine_GBps": 61.0, "sms": 6},
]
DEEPEP_V2_TOKENS = 8192
# V1 (docs/legacy.md): H800, 4096 tokens, top-4 groups (hosts) of top-8, same logical count.
DEEPEP_V1 = [
    {"ranks": 16, "dispatch_GBps": 43.0, "combine_GBps": 43.0},
    {"ranks": 32, "dispatch_GBps": 58.0, "combine_GBps": 57.0},
    {"ranks": 64, "dispatch_GBps": 51.0, "combine_GBps": 50.0},
]


def run_model(w: Workload, p: Params, ranks: Iterable[int] = (16, 32, 64),
              ranks_per_host: int = 8) -> list[OpResult]:
    """Every (shape, op, variant, partial) the report shows."""
    out = []
    for r in ranks:
        s = Shape(r, ranks_per_host)
        for variant in ("exact", "static"):
            out.append(model_op(s, w, p, "dispatch", variant))
            for partial in PARTIALS:
                if variant == "static" and partial == "fp32|raw":
                    continue  # a static buffer reserves fp32 rows: same as fp32
                out.append(model_op(s, w, p, "combine", variant, partial))
    return out


# --------------------------------------------------------------------------------------------
# Report


def _f(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def _op_table(rows: list[OpResult]) -> list[str]:
    head = ("| shape | variant | partial | remote hosts / token | NIC B / token | NIC MB / GPU | "
            "sends / rank | NVLink MB / GPU | µs NIC-bound | µs overlap | µs serial | "
            "eq. GB/s (NIC-bound / overlap / serial) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.shape} ({r.hosts}×8) | {r.variant} | {r.partial} | "
            f"{r.remote_hosts_per_token:.3f} | {_f(r.nic_bytes_per_token)} | "
            f"{r.nic_MB_per_gpu:.1f} | {r.messages_per_rank} | {r.nvlink_MB_per_gpu:.1f} | "
            f"{r.t_nic_bound_us:.0f} | {r.t_overlap_us:.0f} | {r.t_serial_us:.0f} | "
            f"{r.eq_GBps_nic_bound:.0f} / {r.eq_GBps_overlap:.0f} / {r.eq_GBps_serial:.0f} |")
    return lines


def markdown(w: Workload, p: Params, results: list[OpResult],
             compare: list[OpResult]) -> str:
    """The short report: assumptions, formulas, one table per op, DeepEP side by side."""
    pe = p_hit(w.experts, w.experts // 2, w.topk)
    disp = [r for r in results if r.op == "dispatch"]
    comb = [r for r in results if r.op == "combine"]
    L = 8
    md = [
        "# Multi-host cost model (issue 17): EP16 / EP32 / EP64 over 8-GPU hosts",
        "",
        "Written by `python -m bench.cost_model` (CPU, standard library only); a model, not a "
        "measurement. Design modelled (being implemented): hosts of L = 8 ranks (host h = "
        "ranks [8h, 8h+8)); dispatch sends a token at most once to each other host, over NCCL "
        "grouped ncclSend/ncclRecv (InfiniBand/RoCE with GPUDirect RDMA where present) to the "
        "rail peer (same local index on that host), whose intra-host NVLink kernels bring it to "
        "the ranks owning its experts. Combine mirrors it: the (token, host) rows are reduced on "
        "the rail peer, one partial per (token, host) crosses back, the source adds the host "
        "partials in ascending host order.",
        "",
        "## Summary (exact variant; µs with / without NIC–NVLink overlap)",
        "",
        *summary_table(results),
        "",
        "## Assumptions",
        "",
        f"- Workload: T = {w.tokens} tokens per rank, H = {w.hidden}, K = {w.topk}, "
        f"E = {w.experts}, uniform random top-K without replacement, E/R experts per rank; "
        "every figure is an expectation per rank (= per GPU).",
        f"- One 400 Gb/s NIC per GPU: {p.nic_raw_GBps:.0f} GB/s raw per direction × efficiency "
        f"{p.nic_efficiency} = {p.nic_GBps:.0f} GB/s (times scale as 1/efficiency; DeepEP's own "
        "V2 figures imply ≈ 0.9, see below). Full duplex: under uniform routing every GPU sends "
        "and receives the same bytes, so one direction is the bound.",
        f"- NVLink: {p.nvlink_GBps:.0f} GB/s per direction per GPU (copy engine both ways, "
        "nvidia-h200-x2, bench/results/nvidia-h200-x2-2026-11-23.md). Our kernels reached "
        "88 (FP8 dispatch) / 182 (combine) GB/s there at v1: the NVLink stage is a floor.",
        f"- Messages: one ncclSend per rail peer per {p.chunk_bytes / 2**20:g} MiB chunk "
        f"(NCCL itself splits further, NCCL_P2P_NET_CHUNKSIZE = 128 KiB by default); latency "
        f"term = {p.net_latency_us:g} µs + {p.per_message_us:g} µs per send (serial, "
        f"pessimistic); the exact dispatch adds a count round ({p.net_latency_us:g} µs + "
        f"{p.per_message_us:g} µs per peer) and a {p.host_sync_us:g} µs host sync.",
        "- Rows across the NIC: FP8 dispatch row = H + H/128·4 B scales + routing metadata "
        f"K·(4+4)+8 B = {nic_dispatch_row_bytes(w)} B; combine partial = bf16 "
        f"{2 * w.hidden} B, fp32 {4 * w.hidden} B (the contract's \"rounded once\" needs fp32 "
        "partials), or fp32|raw: the raw bf16 row when the host holds the token on one rank "
        "only (compact layout: a single row, weighted at the source), fp32 otherwise.",
        f"- Rows across NVLink: dispatch {nvlink_dispatch_row_bytes(w)} B (the intra-host "
        f"kernels' row: data, scales, align_up(4+3K, 4) int32 metadata); combine: the owners' "
        f"raw bf16 rows, {2 * w.hidden} B, reduced on the rail peer (reduction cost ignored).",
        "- exact: counts first, then only real rows (host sync, not graph-capturable). static: "
        "M = T rows per (source rank, destination host) pair whatever the routing (no sync, "
        "graph-capturable); padding is not forwarded over NVLink.",
        "- overlap: NIC and NVLink stages pipelined over the chunks, max(a, b) + min(a, b)/n; "
        "serial: a + b. Both plus the latency term.",
        "",
        "## Formulas",
        "",
        "- p_host = 1 − C(E − E/Hn, K)/C(E, K) (a given host holds ≥ 1 of the token's experts); "
        "p_rank = 1 − C(E − E/R, K)/C(E, K).",
        "- remote hosts per token = (Hn − 1)·p_host; destination ranks per token = R·p_rank.",
        "- NIC bytes per token (leaving its host; per GPU, since each GPU sends its own tokens "
        "through its own NIC) = (Hn − 1)·p_host·row (exact) or (Hn − 1)·M/T·row (static); per "
        "host pair: p_host·row per source token; per host: L × per GPU.",
        "- NVLink rows pushed per GPU per token = Hn·(L − 1)·p_rank: the own host's owners "
        "(first hop) and each remote host's owners other than the rail peer (second hop).",
        "- t = latency + NIC bytes / (50 GB/s × efficiency) [NIC-bound]; + max / + sum with "
        "NVLink bytes / NVLink rate [overlap / serial].",
        "- eq. GB/s = DeepEP's metric for the same tokens: T·Hn·p_host·(DeepEP bytes per token) "
        "/ t, counting the token's own host (\"logical bandwidth ... contains local rank "
        "traffic\", DeepEP README; tests/elastic/test_ep.py counts, per rank, the tokens with an "
        "expert on each scale-out domain, own domain included unless --ignore-local-traffic, "
        f"× bytes of recv_x + scales + int64 topk_idx + fp32 weights = "
        f"{deepep_dispatch_token_bytes(w)} B dispatch, bf16 row + fp32 weights = "
        f"{deepep_combine_token_bytes(w)} B combine). So NIC GB/s ≈ eq. GB/s × (Hn − 1)/Hn.",
        "",
        f"Check: EP16, p_host = {pe:.4f}, so a token reaches the other host with probability "
        f"{pe:.4f} and the NIC carries {_f(pe * nic_dispatch_row_bytes(w))} B per token.",
        "",
        "## Traffic per token (routing only)",
        "",
        *_traffic_table(w, results),
        "",
        "## Dispatch (FP8)",
        "",
        *_op_table(disp),
        "",
        "## Combine",
        "",
        *_op_table(comb),
        "",
        "## Side by side with DeepEP (SM90, CX7 400 Gb/s)",
        "",
        "DeepEP V2 README: \"8K tokens per batch\" (read here as T = "
        f"{DEEPEP_V2_TOKENS} per rank; bandwidth-bound, the eq. GB/s barely moves with T), "
        "H = 7168, top-8, FP8 dispatch, BF16 combine, logical bandwidth (own host included); E "
        "not stated (256 assumed). DeepEP's combine also sends one bf16 partial per (token, "
        "host): compare with our bf16 column. Our model at the same T, eq. GB/s in DeepEP's "
        "metric (overlap / serial):",
        "",
        "| topology | DeepEP V2 dispatch GB/s | DeepEP V2 combine GB/s | SMs | DeepEP NIC GB/s "
        "implied (d / c) | model dispatch exact | model dispatch static | model combine bf16 | "
        "model combine fp32 | model combine fp32\\|raw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in DEEPEP_V2:
        hn = d["ranks"] // L
        share = (hn - 1) / hn
        mine = {(r.op, r.variant, r.partial): r for r in compare if r.ranks == d["ranks"]}

        def cell(key: tuple[str, str, str]) -> str:
            r = mine[key]
            return f"{r.eq_GBps_overlap:.0f} / {r.eq_GBps_serial:.0f}"

        md.append(
            f"| {d['topo']} | {d['dispatch_GBps']:.0f} | {d['combine_GBps']:.0f} | {d['sms']} | "
            f"{d['dispatch_GBps'] * share:.1f} / {d['combine_GBps'] * share:.1f} | "
            f"{cell(('dispatch', 'exact', 'fp8'))} | {cell(('dispatch', 'static', 'fp8'))} | "
            f"{cell(('combine', 'exact', 'bf16'))} | {cell(('combine', 'exact', 'fp32'))} | "
            f"{cell(('combine', 'exact', 'fp32|raw'))} |")
    v1 = "; ".join(f"EP{d['ranks']} {d['dispatch_GBps']:.0f} / {d['combine_GBps']:.0f}"
                   for d in DEEPEP_V1)
    md += [
        "",
        "DeepEP's \"implied NIC\" column is its logical figure × (Hn − 1)/Hn: both topologies "
        "come out at ≈ 45 GB/s on the wire, 0.9 of 50 GB/s, which is where our efficiency "
        "default comes from. DeepEP V2 publishes no EP64 figure; V1 (docs/legacy.md, H800, "
        f"T = 4096, group-limited routing: a token's experts on at most 4 hosts, so not "
        f"uniform; payload bytes only, own host included) gives {v1} GB/s (dispatch / "
        "combine; V1's documented setting is 24 SMs).",
        "",
        "Our SM count is not modelled: the NIC stage is NCCL's p2p kernel (one CTA per "
        "channel, NCCL_MAX_P2P_NCHANNELS), the NVLink stage our kernels (`num_sms`).",
        "",
        "## Reading",
        "",
        "- EP16 is the NVLink-heavy case: the second hop pushes "
        f"{_nvl_ratio(disp, 16):.1f}× the NIC bytes per GPU (a token reaches ~"
        f"{_dest(disp, 16):.1f} ranks but crosses the NIC once), so being NIC-bound needs ≥ "
        f"{_nvl_ratio(disp, 16) * p.nic_GBps:.0f} GB/s of NVLink per direction; at EP64 the "
        f"ratio is {_nvl_ratio(disp, 64):.1f}.",
        "- static vs exact: at EP16 nearly every token reaches the other host (p_host ≈ "
        f"{pe:.3f}), so static costs little; at EP64 (p_host ≈ "
        f"{p_hit(w.experts, w.experts // 8, w.topk):.2f}) static sends "
        f"{1 / p_hit(w.experts, w.experts // 8, w.topk):.2f}× the exact bytes.",
        "- fp32 partials double the combine's NIC bytes; fp32|raw recovers part of it where "
        "hosts often hold a token on one rank only (EP64).",
        "- Order: adding host partials (each an fp32 sum of its ranks) in ascending host order "
        "groups the sum differently from the single-host Σ over ranks, so multi-host results "
        "can differ in the last bit from a one-host run of the same routing, while staying "
        "deterministic run to run.",
        "",
    ]
    return "\n".join(md)


def summary_table(results: list[OpResult]) -> list[str]:
    """The headline table (exact variant, T of ``results``, overlap unless said): the one the
    README's multi-host section carries."""
    v2 = {d["ranks"]: d for d in DEEPEP_V2}
    v1 = {d["ranks"]: d for d in DEEPEP_V1}
    lines = ["| shape | remote hosts / token | NIC B / token (d / c bf16) | NIC MB / GPU "
             "(d / c bf16) | sends / rank (d / c bf16) | dispatch µs (overlap / serial) | "
             "combine bf16 µs | combine fp32 µs | eq. GB/s (d / c bf16 / c fp32) | "
             "DeepEP published GB/s (d / c) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r.ranks, r.op, r.partial): r for r in results if r.variant == "exact"}
    for ranks in sorted({r.ranks for r in results}):
        d, cb, cf = (by[(ranks, "dispatch", "fp8")], by[(ranks, "combine", "bf16")],
                     by[(ranks, "combine", "fp32")])
        if ranks in v2:
            pub = (f"V2 EP8x{ranks // 8}: {v2[ranks]['dispatch_GBps']:.0f} / "
                   f"{v2[ranks]['combine_GBps']:.0f} ({v2[ranks]['sms']} SMs, T = 8192)")
        elif ranks in v1:
            pub = (f"V1 only: {v1[ranks]['dispatch_GBps']:.0f} / "
                   f"{v1[ranks]['combine_GBps']:.0f} (H800, ≤ 4 hosts per token)")
        else:
            pub = "—"
        lines.append(
            f"| {d.shape} ({d.hosts}×8) | {d.remote_hosts_per_token:.3f} | "
            f"{_f(d.nic_bytes_per_token)} / {_f(cb.nic_bytes_per_token)} | "
            f"{d.nic_MB_per_gpu:.1f} / {cb.nic_MB_per_gpu:.1f} | "
            f"{d.messages_per_rank} / {cb.messages_per_rank} | "
            f"{d.t_overlap_us:.0f} / {d.t_serial_us:.0f} | "
            f"{cb.t_overlap_us:.0f} / {cb.t_serial_us:.0f} | "
            f"{cf.t_overlap_us:.0f} / {cf.t_serial_us:.0f} | "
            f"{d.eq_GBps_overlap:.0f} / {cb.eq_GBps_overlap:.0f} / {cf.eq_GBps_overlap:.0f} | "
            f"{pub} |")
    return lines


def _traffic_table(w: Workload, results: list[OpResult]) -> list[str]:
    lines = ["| shape | p_host | remote hosts / token | dest. ranks / token | P(one rank \\| host) "
             "| NVLink rows / token | host-pair B / token: dispatch, combine bf16, fp32 "
             "| NIC MB / host: dispatch, combine bf16 (exact) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.op != "dispatch" or r.variant != "exact":
            continue
        c = next(x for x in results if x.ranks == r.ranks and x.op == "combine"
                 and x.variant == "exact" and x.partial == "bf16")
        p_host = p_hit(w.experts, w.experts // r.hosts, w.topk)
        single = p_single_rank_in_host(w.experts, w.topk, r.ranks, r.ranks // r.hosts)
        lines.append(
            f"| {r.shape} ({r.hosts}×8) | {p_host:.4f} | {r.remote_hosts_per_token:.3f} | "
            f"{r.dest_ranks_per_token:.2f} | {single:.3f} | {r.nvlink_rows_per_token:.2f} | "
            f"{_f(r.host_pair_bytes_per_token)}, {_f(c.host_pair_bytes_per_token)}, "
            f"{_f(2 * c.host_pair_bytes_per_token)} | {r.nic_MB_per_host:.0f}, "
            f"{c.nic_MB_per_host:.0f} |")
    return lines


def _nvl_ratio(rows: list[OpResult], ranks: int) -> float:
    r = next(x for x in rows if x.ranks == ranks and x.variant == "exact")
    return r.nvlink_MB_per_gpu / r.nic_MB_per_gpu


def _dest(rows: list[OpResult], ranks: int) -> float:
    return next(x for x in rows if x.ranks == ranks).dest_ranks_per_token


def main(argv: list[str] | None = None) -> dict:
    """Command line: compute, write ``cost-model.{md,json}`` under ``--out``, print the md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nic-efficiency", type=float, default=Params.nic_efficiency)
    ap.add_argument("--nvlink-GBps", type=float, default=Params.nvlink_GBps)
    ap.add_argument("--chunk-MiB", type=float, default=Params.chunk_bytes / 2**20)
    ap.add_argument("--tokens", type=int, default=Workload.tokens)
    ap.add_argument("--out", default=RESULTS, help="directory of cost-model.{md,json}")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args(argv)
    w = Workload(tokens=a.tokens)
    p = Params(nic_efficiency=a.nic_efficiency, nvlink_GBps=a.nvlink_GBps,
               chunk_bytes=int(a.chunk_MiB * 2**20))
    results = run_model(w, p)
    compare = run_model(Workload(tokens=DEEPEP_V2_TOKENS), p, ranks=(16, 32))
    md = markdown(w, p, results, compare)
    report = {
        "workload": asdict(w), "params": asdict(p) | {"nic_GBps": p.nic_GBps},
        "ranks_per_host": 8,
        "rows": {"nic_dispatch": nic_dispatch_row_bytes(w),
                 "nvlink_dispatch": nvlink_dispatch_row_bytes(w),
                 "combine_bf16": 2 * w.hidden, "combine_fp32": 4 * w.hidden,
                 "deepep_dispatch_token": deepep_dispatch_token_bytes(w),
                 "deepep_combine_token": deepep_combine_token_bytes(w)},
        "results": [asdict(r) for r in results],
        "deepep_compare": {"tokens": DEEPEP_V2_TOKENS, "model": [asdict(r) for r in compare],
                           "deepep_v2_published": DEEPEP_V2, "deepep_v1_published": DEEPEP_V1},
    }
    if not a.no_write:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cost-model.md"), "w") as f:
            f.write(md)
        with open(os.path.join(a.out, "cost-model.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(md)
    return report


if __name__ == "__main__":
    main()
