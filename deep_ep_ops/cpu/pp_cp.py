"""Reference pipeline-parallel (pp_send_recv) and context-parallel (cp_all_gather,
cp_reduce_scatter) ops."""
from __future__ import annotations

from typing import Sequence

import torch

from deep_ep_ops.buffer import Buffer
from deep_ep_ops.cpu.exchange import all_gather_parts, require_same, send_recv_parts
from deep_ep_ops.meta.shapes import (accumulation_dtype, cp_all_gather_spec,
                                     cp_reduce_scatter_spec, pp_recv_spec)


def pp_send_recv(buf: Buffer, send: torch.Tensor, dst: int, src: int,
                 recv_shape: Sequence[int], recv_dtype: torch.dtype) -> torch.Tensor:
    """Send ``send`` to group rank ``dst``, return what ``src`` sent (-1: none of either)."""
    rank = buf.rank
    if (dst == rank) != (src == rank):
        raise ValueError(f"deep_ep.pp_send_recv: a rank that sends to itself must also receive "
                         f"from itself (dst={dst}, src={src}, rank={rank})")
    spec = pp_recv_spec(src, recv_shape, recv_dtype)
    if dst == rank:
        if tuple(send.shape) != tuple(spec.shape) or send.dtype != spec.dtype:
            raise ValueError(f"deep_ep.pp_send_recv: send {tuple(send.shape)} {send.dtype} does "
                             f"not match recv_shape {tuple(recv_shape)} {recv_dtype}")
        return send.clone()
    got = send_recv_parts(buf, "pp_send_recv", [send] if dst >= 0 else [], dst, src)
    if src < 0:
        return torch.empty(spec.shape, dtype=spec.dtype)
    sent = got[0] if got else None
    if sent is None or tuple(sent.shape) != tuple(spec.shape) or sent.dtype != spec.dtype:
        what = f"shape {tuple(sent.shape)} {sent.dtype}" if sent is not None else "nothing"
        raise ValueError(f"deep_ep.pp_send_recv: rank {src} sends {what} but rank {rank} "
                         f"expects recv_shape {tuple(recv_shape)} {recv_dtype}")
    return sent.clone()


def cp_all_gather(buf: Buffer, x: torch.Tensor) -> torch.Tensor:
    """``[R*n, ...]``: every rank's ``x [n, ...]`` in rank order."""
    per_rank = [parts[0] for parts in all_gather_parts(buf, "cp_all_gather", [x])]
    require_same("cp_all_gather", buf, "x", per_rank)
    return torch.cat(per_rank).reshape(cp_all_gather_spec(x.shape, x.dtype,
                                                          buf.world_size).shape)


def cp_reduce_scatter(buf: Buffer, x: torch.Tensor) -> torch.Tensor:
    """This rank's block of the sum over ranks of ``x [R*m, ...]``, added in ascending rank
    order in fp32 (fp64 for fp64; integers in their own dtype)."""
    per_rank = [parts[0] for parts in all_gather_parts(buf, "cp_reduce_scatter", [x])]
    require_same("cp_reduce_scatter", buf, "x", per_rank)
    chunk = cp_reduce_scatter_spec(x.shape, x.dtype, buf.world_size).shape[0]
    blocks = [t[buf.rank * chunk:(buf.rank + 1) * chunk] for t in per_rank]
    acc = accumulation_dtype(x.dtype) if x.is_floating_point() else x.dtype
    out = blocks[0].to(acc, copy=True)  # a fresh output even for one rank
    for block in blocks[1:]:
        out = out + block.to(acc)
    return out.to(x.dtype)
