"""An independent single-process MoE reference: plain loops over every rank's tokens.

It shares no code with deep_ep_ops.cpu so the two can check each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Case:
    """Inputs of every rank, generated identically on all ranks from one seed."""
    R: int
    E: int
    K: int
    M: int
    H: int
    A: int
    x: list  # [T_r, H] per rank
    scales: Optional[list]  # [T_r, P] per rank or None
    idx: list  # [T_r, K] int64
    w: list  # [T_r, K] float32


def make_case(seed: int, R: int, E: int, K: int, M: int, H: int, A: int,
              tokens: Optional[list[int]] = None, skew: bool = False, fp8: bool = False,
              drop: float = 0.2, dtype: torch.dtype = torch.float32) -> Case:
    g = torch.Generator().manual_seed(seed)
    tokens = tokens if tokens is not None else [
        int(torch.randint(0, M + 1, (1,), generator=g)) for _ in range(R)]
    xs, ss, idxs, ws = [], [], [], []
    for T in tokens:
        if skew:  # every token picks expert 0 first, the rest at random
            rest = [torch.randperm(E - 1, generator=g)[: K - 1] + 1 for _ in range(T)]
            idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.int64), r]) for r in rest]) \
                if T else torch.empty(0, K, dtype=torch.int64)
        else:
            idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) \
                if T else torch.empty(0, K, dtype=torch.int64)
        idx = torch.where(torch.rand(T, K, generator=g) < drop, -1, idx)
        x = torch.randn(T, H, generator=g).to(dtype)
        if fp8:
            ss.append(torch.rand(T, (H + 127) // 128, generator=g) + 0.5)
            x = (torch.randn(T, H, generator=g) * 4).to(torch.float8_e4m3fn)
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand(T, K, generator=g))
    return Case(R, E, K, M, H, A, xs, ss if fp8 else None, idxs, ws)


def source_order(R: int, ranks_per_host: int) -> list[int]:
    """Source ranks in the order their rows arrive: by (local index in the host, host), i.e.
    (forwarding rank, source host); one host: 0 .. R-1."""
    L = ranks_per_host
    return [h * L + l for l in range(L) for h in range(R // L)]


def expected_dispatch(case: Case, d: int, expand: bool, ranks_per_host: Optional[int] = None):
    """Rows rank ``d`` must receive: dict of real (unpadded-capacity) outputs plus, per row,
    the (src rank, src token) it came from; expert-major rows include alignment padding.
    Rows are ordered by ``source_order`` (several hosts: forwarder, source host), then token."""
    E_loc = case.E // case.R
    lo = d * E_loc
    sources = source_order(case.R, ranks_per_host or case.R)
    rows = []  # (src, tok, k or None, local expert or None)
    if not expand:
        for s in sources:
            for t in range(case.idx[s].shape[0]):
                ids = case.idx[s][t].tolist()
                if any(e >= 0 and e // E_loc == d for e in ids):
                    rows.append((s, t, None, None))
    else:
        for j in range(E_loc):
            block = []
            for s in sources:
                for t in range(case.idx[s].shape[0]):
                    ids = case.idx[s][t].tolist()
                    if lo + j in ids:
                        block.append((s, t, ids.index(lo + j), j))
            rows += block
            while len(rows) % case.A:
                rows.append(None)
    H = case.H
    dtype = case.x[0].dtype
    n = len(rows)
    recv_x = torch.zeros(n, H, dtype=dtype)
    P = case.scales[0].shape[1] if case.scales else 0
    recv_s = torch.zeros(n, P)
    if expand:
        recv_idx = torch.full((n,), -1, dtype=torch.int32)
        recv_w = torch.zeros(n)
    else:
        recv_idx = torch.full((n, case.K), -1, dtype=torch.int64)
        recv_w = torch.zeros(n, case.K)
    counts = torch.zeros(E_loc, dtype=torch.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        s, t, k, j = row
        recv_x[i] = case.x[s][t]
        if case.scales:
            recv_s[i] = case.scales[s][t]
        if expand:
            recv_idx[i] = j
            recv_w[i] = case.w[s][t][k]
            counts[j] += 1
        else:
            for kk, e in enumerate(case.idx[s][t].tolist()):
                if e >= 0 and e // E_loc == d:
                    recv_idx[i, kk] = e - lo
                    recv_w[i, kk] = case.w[s][t][kk]
                    counts[e - lo] += 1
    return dict(rows=rows, recv_x=recv_x, recv_s=recv_s, recv_idx=recv_idx, recv_w=recv_w,
                tokens_per_expert=counts)


def expected_combine(case: Case, owner: int, per_rank_rows: list, per_rank_y: list,
                     per_rank_weights: list, out_dtype: torch.dtype,
                     ranks_per_host: Optional[int] = None) -> torch.Tensor:
    """out[t] = sum over hosts (ascending) of the host sum, the host sum = sum over its
    destination ranks (ascending) of that rank's partial, each partial the sum of its rows of
    t (ascending) of w*y; fp32, sequential, first-term start (one host: ranks ascending)."""
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    T = case.idx[owner].shape[0]
    L = ranks_per_host or case.R
    out = torch.zeros(T, per_rank_y[0].shape[1], dtype=acc_dtype)
    for t in range(T):
        total = None
        for host in range(case.R // L):
            host_sum = None
            for d in range(host * L, (host + 1) * L):
                partial = _rank_partial(per_rank_rows[d], per_rank_y[d], per_rank_weights[d],
                                        owner, t, acc_dtype)
                if partial is not None:
                    host_sum = partial if host_sum is None else host_sum + partial
            if host_sum is not None:
                total = host_sum if total is None else total + host_sum
        if total is not None:
            out[t] = total
    return out.to(out_dtype)


def _rank_partial(rows: list, y: torch.Tensor, weights: Optional[torch.Tensor], owner: int,
                  t: int, acc_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Sum over the rows of (owner, t) at one rank, ascending, of w*y (None: no row)."""
    partial = None
    for i, row in enumerate(rows):
        if row is None or row[0] != owner or row[1] != t:
            continue
        term = y[i].to(acc_dtype)
        if weights is not None:
            term = term * weights[i].to(acc_dtype)
        partial = term if partial is None else partial + term
    return partial
