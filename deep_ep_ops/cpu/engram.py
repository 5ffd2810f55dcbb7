"""Reference engram_fetch and its backward (the scatter-add into the owners' shards)."""
from __future__ import annotations

import torch

from deep_ep_ops.buffer import Buffer
from deep_ep_ops.cpu.exchange import all_gather_parts, require_same
from deep_ep_ops.meta.shapes import accumulation_dtype, engram_fetch_spec, engram_grad_spec


def engram_fetch(buf: Buffer, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[N, L*H]``: the rows ``indices [N, L]`` name in the table sharded over the ranks
    (global row g on rank g // n), zero for -1."""
    hidden = table.shape[1]
    spec = engram_fetch_spec(indices.shape, hidden, table.dtype)
    shards = [parts[0] for parts in all_gather_parts(buf, "engram_fetch", [table])]
    require_same("engram_fetch", buf, "table", shards)
    tables = torch.cat(shards)  # [R*n, H]
    flat = indices.reshape(-1).long()
    out = torch.zeros(flat.numel(), hidden, dtype=table.dtype)
    valid = flat >= 0
    out[valid] = tables[flat[valid]]
    return out.reshape(spec.shape)


def engram_scatter_add(buf: Buffer, grad: torch.Tensor, indices: torch.Tensor,
                       num_entries: int, hidden: int) -> torch.Tensor:
    """Sum, in (source rank, token, slot) order, every rank's row gradients that fall in this
    rank's shard: ``[num_entries, hidden]`` in grad's dtype, accumulated in fp32 (fp64)."""
    acc = accumulation_dtype(grad.dtype)
    rows = grad.reshape(-1, hidden).to(acc)
    gathered = all_gather_parts(buf, "engram_fetch backward",
                                [rows, indices.reshape(-1).long()])
    require_same("engram_fetch backward", buf, "grad", [g[0] for g in gathered],
                 rows_may_differ=True)
    out = torch.zeros(engram_grad_spec(num_entries, hidden, grad.dtype).shape, dtype=acc)
    lo = buf.rank * num_entries
    for r_rows, r_idx in gathered:
        mine = (r_idx >= lo) & (r_idx < lo + num_entries)
        out.index_add_(0, r_idx[mine] - lo, r_rows[mine])
    return out.to(grad.dtype)
