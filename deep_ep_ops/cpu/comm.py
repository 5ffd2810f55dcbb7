"""Byte-level collectives for the reference backend: any dtype (bf16, fp8 included) travels
as uint8 so gloo never sees a dtype it does not support."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_same_shape(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[R, *t.shape]``: every rank's tensor, which must have the same shape everywhere."""
    R = dist.get_world_size(group)
    if R == 1:
        return t.unsqueeze(0).clone()
    flat = t.contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    parts = [torch.empty_like(raw) for _ in range(R)]
    dist.all_gather(parts, raw, group=group)
    return torch.stack([p.view(t.dtype) if p.numel() else torch.empty(0, dtype=t.dtype)
                        for p in parts]).reshape(R, *t.shape)


def all_gather_ints(values: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """``[R, len(values)]`` int64."""
    return all_gather_same_shape(torch.tensor(values, dtype=torch.int64), group)


def all_gather_padded(t: torch.Tensor, rows: int, group: dist.ProcessGroup,
                      fill: float = 0) -> torch.Tensor:
    """Pad dim 0 of ``t`` to ``rows`` with ``fill`` and gather: ``[R, rows, *t.shape[1:]]``."""
    padded = t.new_zeros((rows, *t.shape[1:]))
    if fill != 0:
        padded.fill_(fill)
    padded[: t.shape[0]] = t
    return all_gather_same_shape(padded, group)


def all_gather_varlen(t: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's tensor, whose dim 0 may differ between ranks (other dims equal)."""
    sizes = all_gather_ints([t.shape[0]], group)[:, 0].tolist()
    gathered = all_gather_padded(t, max(sizes), group)
    return [gathered[r, : sizes[r]] for r in range(len(sizes))]
