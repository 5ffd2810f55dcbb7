"""CUDA backend of dispatch / cached_dispatch / combine (single node, NVLink load/store).

Thin glue: every op is one call into the JIT-built extension (``loader.load()``), which
allocates fresh outputs on the current stream and launches the kernels. Setup allocates the
peer-memory windows through the Buffer's transport (``transport.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from deep_ep_ops.cuda import loader, transport

_ext = None


def _module():
    global _ext
    if _ext is None:
        ext = loader.load()
        from deep_ep_ops import ops
        ops._use_cpp_kernels(ext)  # C++ CUDA kernels of _dispatch_static / cached_dispatch / combine
        _ext = ext
    return _ext


def create_state(buf):
    """Collective over ``buf.group``: pick the transport, allocate the EP window with it.
    Returns ``(state, transport)``; the aux state shares the transport."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("deep_ep_ops: a Buffer cannot be created during CUDA graph capture; "
                           "create it before capturing")
    ext = _module()
    peer_memory = transport.create(ext, buf, buf.requested_transport)
    device = buf.device.index if buf.device.index is not None else torch.cuda.current_device()
    state = ext.create_state(peer_memory, buf.rank, buf.world_size,
                             buf.num_max_tokens_per_rank, buf.hidden, buf.num_topk,
                             buf.num_experts, bool(buf.fp8_dispatch), float(buf.timeout_s),
                             device)
    # the C++ kernels of the ops find the state by group name (csrc/runtime/torch_ops.cpp)
    ext.register_group(buf.group_name, state)
    return state, peer_memory


def unregister(group_name: str) -> None:
    """Forget the group in the C++ registry (its ops then go through Python's get_buffer)."""
    if _ext is not None:
        _ext.unregister_group(group_name)


def destroy_state(state, group_name: Optional[str] = None) -> None:
    """Collective: free the window (call on every rank, before destroy_process_group)."""
    torch.cuda.synchronize()
    if group_name is not None:
        unregister(group_name)
    _module().destroy_state(state)


_OPS = {1: "dispatch (count exchange)", 2: "dispatch (data push)",
        3: "cached_dispatch (staging)", 4: "cached_dispatch (pull)", 5: "combine (push)",
        6: "dispatch (one rank: tile counts)"}
_OP_LOCAL_TILES = 6  # kOpLocalTiles: a wait on a tile of the same kernel, not on a peer


def last_error(state) -> Optional[dict]:
    """The first GPU-side timeout this state recorded (which peer/barrier stalled), or None."""
    code, rank, peer, slot, expected, seen, op = _module().error_record(state)
    if code == 0:
        return None
    if op == _OP_LOCAL_TILES:
        message = (f"rank {rank}: GPU timeout in {_OPS[op]} waiting for tile {slot} of the same "
                   f"kernel (call tag {expected}, saw {seen})")
    else:
        message = (f"rank {rank}: GPU timeout in {_OPS.get(op, '?')} waiting for peer rank "
                   f"{peer} (barrier slot {slot}, expected epoch {expected}, saw {seen})")
    return dict(rank=rank, peer=peer, slot=slot, expected=expected, seen=seen, op=op,
                message=message)


def dispatch(buf, state, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
             expand, exact, num_sms):
    return _ext.dispatch(state, x, x_scales, topk_idx, topk_weights, num_experts,
                         expert_alignment, expand, exact, num_sms)


def cached_dispatch(buf, state, x, x_scales, handle, num_sms):
    return _ext.cached_dispatch(state, x, x_scales, handle, num_sms)


def combine(buf, state, x, handle, weights, num_sms):
    return _ext.combine(state, x, handle, weights, num_sms)


# pp_send_recv / cp_all_gather / cp_reduce_scatter / engram_fetch (+ backward): aux_backend.py
from deep_ep_ops.cuda.aux_backend import (  # noqa: E402,F401
    aux_last_error, cp_all_gather, cp_input, cp_reduce_scatter, create_aux_state,
    destroy_aux_state, engram_fetch, engram_scatter_add, engram_table, pp_send_recv)
