"""The multi-host cost model's arithmetic (bench/cost_model.py) against hand-computed values and
Monte-Carlo estimates with fixed seeds. CPU, standard library, well under a second."""
from __future__ import annotations

import json
import random

import pytest

from bench import cost_model as cm

W = cm.Workload()  # T = 4096, H = 7168, K = 8, E = 256


def _no_expert_in(group: int, experts: int = 256, topk: int = 8) -> float:
    """C(E − group, K)/C(E, K) written out as the product a hand computation uses."""
    q = 1.0
    for i in range(topk):
        q *= (experts - group - i) / (experts - i)
    return q


@pytest.mark.parametrize("hosts", [2, 4, 8])
def test_remote_hosts_formula_matches_monte_carlo(hosts: int) -> None:
    exact = cm.expected_remote_hosts(256, 8, hosts)
    assert exact == pytest.approx((hosts - 1) * (1 - _no_expert_in(256 // hosts)), rel=1e-12)
    sampled = cm.monte_carlo_remote_hosts(256, 8, hosts, trials=20000, seed=17)
    assert sampled == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize("ranks", [16, 64])
def test_single_rank_probability_matches_monte_carlo(ranks: int) -> None:
    per_rank, L = 256 // ranks, 8
    rng = random.Random(5)
    hit = single = 0
    for _ in range(20000):
        on_host0 = {e // per_rank for e in rng.sample(range(256), 8) if e // per_rank < L}
        hit += bool(on_host0)
        single += len(on_host0) == 1
    assert cm.p_single_rank_in_host(256, 8, ranks, L) == pytest.approx(single / hit, abs=0.01)


def test_row_sizes_by_hand() -> None:
    assert cm.scale_bytes(7168) == 56 * 4 == 224
    assert cm.routing_meta_bytes(8) == 8 * (4 + 4) + 8 == 72
    assert cm.nic_dispatch_row_bytes(W) == 7168 + 224 + 72 == 7464
    assert cm.nvlink_dispatch_row_bytes(W) == 7168 + 224 + 28 * 4 == 7504
    assert cm.combine_partial_bytes(W, "bf16", 0.3) == 14336
    assert cm.combine_partial_bytes(W, "fp32", 0.3) == 28672
    assert cm.combine_partial_bytes(W, "fp32|raw", 0.25) == 0.25 * 14336 + 0.75 * 28672
    assert cm.deepep_dispatch_token_bytes(W) == 7168 + 224 + 8 * 8 + 8 * 4 == 7488
    assert cm.deepep_combine_token_bytes(W) == 14336 + 32 == 14368


def test_ep16_exact_dispatch_bytes_by_hand() -> None:
    r = cm.model_op(cm.Shape(16), W, cm.Params(), "dispatch", "exact")
    p_host = 1 - _no_expert_in(128)          # 0.99651...
    assert p_host == pytest.approx(0.996510, abs=1e-6)
    assert r.remote_hosts_per_token == pytest.approx(p_host)
    assert r.nic_bytes_per_token == pytest.approx(p_host * 7464)     # 7,438 B
    assert r.nic_MB_per_gpu == pytest.approx(4096 * p_host * 7464 / 1e6)
    assert r.nic_MB_per_host == pytest.approx(8 * r.nic_MB_per_gpu)
    p_rank = 1 - _no_expert_in(16)
    assert r.dest_ranks_per_token == pytest.approx(16 * p_rank)
    assert r.nvlink_rows_per_token == pytest.approx(2 * 7 * p_rank)
    # 30.4 MB per peer in 2 MiB chunks: 15 sends, plus one count message
    assert r.messages_per_rank == 15 + 1


def test_ep64_static_dispatch_time_by_hand() -> None:
    p = cm.Params()
    r = cm.model_op(cm.Shape(64), W, p, "dispatch", "static")
    nic = 7 * 4096 * 7464                    # M = T rows to each of 7 hosts: 214,007,808 B
    assert r.nic_MB_per_gpu == pytest.approx(nic / 1e6)
    sends = 7 * 15                           # 30.6 MB per peer in 2 MiB chunks
    assert r.messages_per_rank == sends
    assert r.t_nic_bound_us == pytest.approx(5.0 + sends * 1.0 + nic / 45e9 * 1e6)
    assert r.t_nvlink_us == pytest.approx(r.nvlink_MB_per_gpu * 1e6 / 357e9 * 1e6)
    a, b = r.t_nic_bw_us, r.t_nvlink_us
    assert r.t_serial_us == pytest.approx(r.t_latency_us + a + b)
    assert r.t_overlap_us == pytest.approx(r.t_latency_us + max(a, b) + min(a, b) / sends)


def test_equivalent_bandwidth_is_deepeps_logical_count() -> None:
    r = cm.model_op(cm.Shape(32), W, cm.Params(), "combine", "exact", "bf16")
    logical = 4096 * 4 * (1 - _no_expert_in(64)) * 14368   # own host counted, as DeepEP does
    assert r.deepep_logical_MB_per_gpu == pytest.approx(logical / 1e6)
    assert r.eq_GBps_overlap == pytest.approx(logical / (r.t_overlap_us * 1e3))
    # NIC-bound at efficiency 0.9 with no latency: eq. GB/s = 45 · Hn/(Hn − 1) · 14368/14336
    q = cm.Params(net_latency_us=0.0, per_message_us=0.0)
    r0 = cm.model_op(cm.Shape(32), W, q, "combine", "exact", "bf16")
    assert r0.eq_GBps_nic_bound == pytest.approx(45 * 4 / 3 * 14368 / 14336)


def test_static_sends_worst_case_and_fp32_doubles_combine() -> None:
    p = cm.Params()
    s = cm.model_op(cm.Shape(64), W, p, "combine", "static", "fp32")
    e16 = cm.model_op(cm.Shape(64), W, p, "combine", "exact", "bf16")
    e32 = cm.model_op(cm.Shape(64), W, p, "combine", "exact", "fp32")
    assert s.nic_bytes_per_token == 7 * 28672
    assert e32.nic_bytes_per_token == pytest.approx(2 * e16.nic_bytes_per_token)
    mixed = cm.model_op(cm.Shape(64), W, p, "combine", "exact", "fp32|raw")
    assert e16.nic_bytes_per_token < mixed.nic_bytes_per_token < e32.nic_bytes_per_token


def test_main_writes_report(tmp_path) -> None:
    report = cm.main(["--out", str(tmp_path)])
    md = (tmp_path / "cost-model.md").read_text()
    data = json.loads((tmp_path / "cost-model.json").read_text())
    assert data["rows"]["nic_dispatch"] == 7464 and report["rows"] == data["rows"]
    assert {r["shape"] for r in data["results"]} == {"EP16", "EP32", "EP64"}
    assert "| EP8x2 | 90 | 81 | 12 |" in md and "| EP8x4 | 61 | 61 | 6 |" in md
    for name in ("Dispatch (FP8)", "Combine", "Assumptions", "Formulas"):
        assert f"## {name}" in md
