"""CUDA backend of pp_send_recv, cp_all_gather, cp_reduce_scatter, engram_fetch and its backward.

Re-exported by ``deep_ep_ops.cuda.backend`` (ops.py looks the functions up there by op name).
Each op is one call into the extension on a per-Buffer ``AuxState``: a peer-memory window of
its own from the Buffer's transport, created with the Buffer (allocation is collective and
impossible during graph capture), so these ops never share barriers or staging with dispatch /
combine.

Paths: messages / blocks up to ``*_inline_bytes`` go through one 1-CTA kernel (wait, NVLink
stores, signal); larger ones move with the copy engine (``cudaMemcpyAsync`` to or from peer
addresses, 0 SMs) between 1-thread signalling kernels. Sequence numbers and epochs live in
device memory, so captured CUDA graphs replay correctly.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Defaults (per Buffer). The bulk sizes cost symmetric memory: pp R*pp_max_bytes, cp cp_max_bytes.
PP_MAX_BYTES = 16 << 20
PP_SLOTS = 4
CP_MAX_BYTES = 32 << 20
# Below these sizes one small kernel beats a copy-engine round trip (launch + two signals).
PP_INLINE_BYTES = int(os.environ.get("DEEP_EP_OPS_PP_INLINE_BYTES", 64 << 10))
CP_INLINE_BYTES = int(os.environ.get("DEEP_EP_OPS_CP_INLINE_BYTES", 64 << 10))

_OPS = {21: "pp_send_recv (inline send, waiting for a free slot)",
        22: "pp_send_recv (inline recv)", 23: "pp_send_recv (bulk send, waiting for the slot)",
        24: "pp_send_recv (bulk recv)", 25: "cp collective (inline)",
        26: "cp collective (data ready)", 27: "cp collective (reads done)",
        28: "engram_fetch (entry)", 29: "engram_fetch (reads done)",
        30: "engram backward (gradients staged)", 31: "engram backward (reads done)"}


def _ext():
    from deep_ep_ops.cuda import backend
    return backend._module()


def create_aux_state(buf, peer_memory):
    """Collective over ``buf.group``: the aux window (pp slots, cp staging, flags), allocated
    through the transport of the Buffer's EP state."""
    device = buf.device.index if buf.device.index is not None else torch.cuda.current_device()
    aux = _ext().create_aux_state(
        peer_memory, buf.rank, buf.world_size, device, float(buf.timeout_s),
        int(buf.pp_max_bytes), PP_INLINE_BYTES, int(buf.pp_slots), int(buf.cp_max_bytes),
        CP_INLINE_BYTES)
    _ext().register_group_aux(buf.group_name, aux)  # C++ registry (torch_ops.cpp)
    return aux


def destroy_aux_state(aux, group_name: Optional[str] = None) -> None:
    """Collective: free the aux window and the Engram tables (before destroy_process_group)."""
    torch.cuda.synchronize()
    if group_name is not None:
        from deep_ep_ops.cuda.backend import unregister
        unregister(group_name)
    _ext().destroy_aux_state(aux)


def aux_last_error(aux) -> Optional[dict]:
    """The first GPU-side error the aux ops recorded (timeout: which peer stalled), or None."""
    code, rank, peer, slot, expected, seen, op = _ext().aux_error_record(aux)
    if code == 0:
        return None
    what = {1: "GPU timeout", 2: "engram index out of range", 3: "pp size mismatch"}.get(code, "?")
    message = (f"rank {rank}: {what} in {_OPS.get(op, '?')} (peer rank {peer}, expected "
               f"{expected}, saw {seen})")
    return dict(code=code, rank=rank, peer=peer, expected=expected, seen=seen, op=op,
                message=message)


def pp_send_recv(buf, state, send, dst, src, recv_shape, recv_dtype):
    return _ext().pp_send_recv(buf.aux_state, send, dst, src, [int(s) for s in recv_shape],
                               recv_dtype)


def cp_all_gather(buf, state, x):
    return _ext().cp_all_gather(buf.aux_state, x)


def cp_reduce_scatter(buf, state, x):
    return _ext().cp_reduce_scatter(buf.aux_state, x)


def cp_input(buf, shape, dtype):
    device = buf.device.index if buf.device.index is not None else torch.cuda.current_device()
    return _ext().cp_input(buf.aux_state, [int(s) for s in shape], dtype, device)


def engram_table(buf, state, num_entries_per_rank, hidden, dtype, max_fetch_rows=None):
    if max_fetch_rows is None:
        max_fetch_rows = default_max_fetch_rows(buf)
    device = buf.device.index if buf.device.index is not None else torch.cuda.current_device()
    return _ext().engram_table(buf.aux_state, int(num_entries_per_rank), int(hidden), dtype,
                               int(max_fetch_rows), device)


def default_max_fetch_rows(buf) -> int:
    """Staging of the Engram backward when engram_table() is not told: 32 rows per token."""
    return 32 * buf.num_max_tokens_per_rank


def engram_fetch(buf, state, table, indices):
    return _ext().engram_fetch(buf.aux_state, table, indices)


def engram_scatter_add(buf, state, grad, indices, num_entries, hidden):
    return _ext().engram_scatter_add(buf.aux_state, grad, indices, int(num_entries),
                                     int(hidden))
