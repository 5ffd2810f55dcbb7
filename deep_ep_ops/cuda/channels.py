"""CUDA backend of pp_send_recv, cp_all_gather, cp_reduce_scatter, engram_fetch and its backward.

Each op is one call into the extension on the Buffer's channel state: a peer-memory window of
its own from the Buffer's transport (flags, pp slots, cp staging; Engram tables in windows of
their own), created with the Buffer (allocation is collective and impossible during graph
capture), so these ops never share barriers or staging with dispatch / combine.

Paths: messages / blocks up to ``*_INLINE_BYTES`` go through one 1-CTA kernel (wait, stores,
signal); larger ones move with the copy engine (``cudaMemcpyAsync`` to or from peer addresses,
0 SMs) between 1-thread signalling kernels. Sequence numbers and epochs live in device memory,
so captured CUDA graphs replay correctly.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from deep_ep_ops.cuda import extension

# A deep_ep_ops.buffer.Buffer. Not imported: the Buffer module imports this one.
BufferT = Any

# Below these sizes one small kernel beats a copy-engine round trip (launch + two signals).
PP_INLINE_BYTES = int(os.environ.get("DEEP_EP_OPS_PP_INLINE_BYTES", 64 << 10))
CP_INLINE_BYTES = int(os.environ.get("DEEP_EP_OPS_CP_INLINE_BYTES", 64 << 10))


def create_state(buf: BufferT, peer_memory: Any) -> Any:
    """Collective over ``buf.group``: the channel window (pp slots, cp staging, flags),
    allocated through the transport of the Buffer's EP state."""
    return extension.module().create_channel_state(
        peer_memory, buf.rank, buf.world_size, buf.device_index, float(buf.timeout_s),
        int(buf.pp_max_bytes), PP_INLINE_BYTES, int(buf.pp_slots), int(buf.cp_max_bytes),
        CP_INLINE_BYTES)


def destroy_state(state: Any) -> None:
    """Collective: free the channel window and the Engram tables (before
    destroy_process_group)."""
    torch.cuda.synchronize()
    extension.module().destroy_channel_state(state)


def last_error(state: Any) -> Optional[dict]:
    """The first GPU-side error the channel ops recorded (timeout: which peer stalled), or
    None."""
    return extension.module().channel_last_error(state)


def default_max_fetch_rows(buf: BufferT) -> int:
    """Staging of the Engram backward when engram_table() is not told: 32 rows per token."""
    return 32 * buf.num_max_tokens_per_rank


def pp_send_recv(buf: BufferT, send, dst, src, recv_shape, recv_dtype):
    return extension.module().pp_send_recv(buf.channel_state, send, dst, src,
                                           [int(s) for s in recv_shape], recv_dtype)


def cp_all_gather(buf: BufferT, x):
    return extension.module().cp_all_gather(buf.channel_state, x)


def cp_reduce_scatter(buf: BufferT, x):
    return extension.module().cp_reduce_scatter(buf.channel_state, x)


def cp_input(buf: BufferT, shape, dtype):
    return extension.module().cp_input(buf.channel_state, [int(s) for s in shape], dtype,
                                       buf.device_index)


def engram_table(buf: BufferT, num_entries_per_rank, hidden, dtype, max_fetch_rows=None):
    if max_fetch_rows is None:
        max_fetch_rows = default_max_fetch_rows(buf)
    return extension.module().engram_table(buf.channel_state, int(num_entries_per_rank),
                                           int(hidden), dtype, int(max_fetch_rows),
                                           buf.device_index)


def engram_fetch(buf: BufferT, table, indices):
    return extension.module().engram_fetch(buf.channel_state, table, indices)


def engram_scatter_add(buf: BufferT, grad, indices, num_entries, hidden):
    return extension.module().engram_scatter_add(buf.channel_state, grad, indices,
                                                 int(num_entries), int(hidden))
