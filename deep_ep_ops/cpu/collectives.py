"""Reference engram_fetch, pp_send_recv and context-parallel all-gather / reduce-scatter."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from deep_ep_ops.buffer import Buffer
from deep_ep_ops.cpu.comm import all_gather_same_shape, all_gather_varlen
from deep_ep_ops.cpu.moe import accumulation_dtype
from deep_ep_ops.meta.shapes import (cp_all_gather_spec, cp_reduce_scatter_spec,
                                     engram_fetch_spec, engram_grad_spec, pp_recv_spec)


_DTYPE_CODES = {dt: i for i, dt in enumerate((
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool))}
_MAX_DIMS = 8


def _meta_of(t: torch.Tensor) -> torch.Tensor:
    dims = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
    return torch.tensor([t.dim(), _DTYPE_CODES.get(t.dtype, -1)] + dims, dtype=torch.int64)


def _shape_in(meta: torch.Tensor) -> tuple:
    return tuple(meta[2: 2 + int(meta[0])].tolist())


def _check_same_shape_everywhere(op: str, buf: Buffer, t: torch.Tensor) -> None:
    gathered = all_gather_same_shape(_meta_of(t), buf.group)
    if not bool((gathered == gathered[0]).all()):
        raise ValueError(f"deep_ep.{op}: x must have the same shape and dtype on every rank of "
                         f"{buf.group_name!r}; got shapes {[_shape_in(m) for m in gathered]}")


def engram_fetch(buf: Buffer, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    hidden = table.shape[1]
    spec = engram_fetch_spec(indices.shape, hidden, table.dtype)
    tables = all_gather_same_shape(table, buf.group).reshape(-1, hidden)  # [R*n, H]
    flat = indices.reshape(-1).long()
    out = torch.zeros(flat.numel(), hidden, dtype=table.dtype)
    valid = flat >= 0
    out[valid] = tables[flat[valid]]
    return out.reshape(spec.shape)


def engram_scatter_add(buf: Buffer, grad: torch.Tensor, indices: torch.Tensor,
                       num_entries: int, hidden: int) -> torch.Tensor:
    """Sum, in (source rank, token, slot) order, every rank's row gradients that fall in this
    rank's shard."""
    acc = accumulation_dtype(grad.dtype)
    rows = grad.reshape(-1, hidden).to(acc)
    all_rows = all_gather_varlen(rows, buf.group)
    all_idx = all_gather_varlen(indices.reshape(-1).long(), buf.group)
    out = torch.zeros(engram_grad_spec(num_entries, hidden, grad.dtype).shape, dtype=acc)
    lo = buf.rank * num_entries
    for r_rows, r_idx in zip(all_rows, all_idx):
        mine = (r_idx >= lo) & (r_idx < lo + num_entries)
        out.index_add_(0, r_idx[mine] - lo, r_rows[mine])
    return out.to(grad.dtype)


def pp_send_recv(buf: Buffer, send: torch.Tensor, dst: int, src: int,
                 recv_shape: Sequence[int], recv_dtype: torch.dtype) -> torch.Tensor:
    rank = buf.rank
    if (dst == rank) != (src == rank):
        raise ValueError(f"deep_ep.pp_send_recv: a rank that sends to itself must also receive "
                         f"from itself (dst={dst}, src={src}, rank={rank})")
    spec = pp_recv_spec(src, recv_shape, recv_dtype)
    out = torch.empty(spec.shape, dtype=spec.dtype)
    if dst == rank:
        if tuple(send.shape) != tuple(out.shape) or send.dtype != out.dtype:
            raise ValueError(f"deep_ep.pp_send_recv: send {tuple(send.shape)} {send.dtype} does "
                             f"not match recv_shape {tuple(recv_shape)} {recv_dtype}")
        return send.clone()
    group = buf.group
    peer = lambda r: dist.get_global_rank(group, r)  # noqa: E731  p2p takes global ranks
    # Shapes travel first so a mismatch is a clear error instead of garbage.
    reqs = []
    meta_in = torch.empty(2 + _MAX_DIMS, dtype=torch.int64)
    if dst >= 0:
        reqs.append(dist.isend(_meta_of(send), peer(dst), group=group))
    if src >= 0:
        reqs.append(dist.irecv(meta_in, peer(src), group=group))
    for r in reqs:
        r.wait()
    if src >= 0 and not torch.equal(meta_in, _meta_of(out)):
        raise ValueError(
            f"deep_ep.pp_send_recv: rank {src} sends shape {_shape_in(meta_in)} "
            f"but rank {rank} expects recv_shape {tuple(recv_shape)} {recv_dtype}")
    reqs = []
    payload = send.contiguous()
    if dst >= 0 and payload.numel():
        reqs.append(dist.isend(payload.view(torch.uint8).reshape(-1), peer(dst), group=group))
    if src >= 0 and out.numel():
        reqs.append(dist.irecv(out.view(torch.uint8).reshape(-1), peer(src), group=group))
    for r in reqs:
        r.wait()
    return out


def cp_all_gather(buf: Buffer, x: torch.Tensor) -> torch.Tensor:
    _check_same_shape_everywhere("cp_all_gather", buf, x)
    gathered = all_gather_same_shape(x, buf.group)
    return gathered.reshape(cp_all_gather_spec(x.shape, x.dtype, buf.world_size).shape)


def cp_reduce_scatter(buf: Buffer, x: torch.Tensor) -> torch.Tensor:
    _check_same_shape_everywhere("cp_reduce_scatter", buf, x)
    R = buf.world_size
    chunk = cp_reduce_scatter_spec(x.shape, x.dtype, R).shape[0]
    gathered = all_gather_same_shape(x, buf.group)[:, buf.rank * chunk:(buf.rank + 1) * chunk]
    acc = accumulation_dtype(x.dtype) if x.is_floating_point() else x.dtype
    out = gathered[0].to(acc)
    for r in range(1, R):
        out = out + gathered[r].to(acc)
    return out.to(x.dtype)
