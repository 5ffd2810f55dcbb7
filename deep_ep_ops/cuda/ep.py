"""CUDA backend of the EP family: dispatch / cached_dispatch / combine (one host, peer memory
from the Buffer's transport). Thin glue: every op is one call into the extension, which
allocates fresh outputs on the current stream and launches the kernels. On the eager path the
extension's C++ kernels (registered on the CUDA key) are called by the dispatcher directly;
these functions serve the Python CUDA kernels and tests that call the backend itself."""
from __future__ import annotations

from typing import Any, Optional

import torch

from deep_ep_ops.cuda import extension, transport

# A deep_ep_ops.buffer.Buffer. Not imported: the Buffer module imports this one.
BufferT = Any


def create_state(buf: BufferT) -> tuple[Any, Any]:
    """Collective over ``buf.group``: pick the transport, allocate the EP window with it.
    Returns ``(state, peer_memory)``; the channel state of pp / cp / engram shares the
    transport."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("deep_ep_ops: a Buffer cannot be created during CUDA graph capture; "
                           "create it before capturing")
    ext = extension.module()
    peer_memory = transport.create(ext, buf, buf.requested_transport)
    state = ext.create_state(peer_memory, buf.id, buf.rank, buf.world_size,
                             buf.num_max_tokens_per_rank, buf.hidden, buf.num_topk,
                             buf.num_experts, bool(buf.fp8_dispatch), float(buf.timeout_s),
                             buf.device_index, buf.direct_outputs, buf.zero_copy_combine)
    return state, peer_memory


def combine_input(buf: BufferT, num_rows: int, width: int, dtype) -> torch.Tensor:
    """The next combine-input slot as a ``[num_rows, width]`` tensor (Buffer.combine_input)."""
    return extension.module().combine_input(buf.ep_state, num_rows, width, dtype)


def destroy_state(state: Any) -> None:
    """Collective: free the window (call on every rank, before destroy_process_group)."""
    torch.cuda.synchronize()
    extension.module().destroy_state(state)


def last_error(state: Any) -> Optional[dict]:
    """The first GPU-side timeout this state recorded (which peer stalled), or None."""
    return extension.module().ep_last_error(state)


def dispatch(buf: BufferT, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
             expand, num_sms):
    """Static capacity (exact=True is the local trim that follows, deep_ep_ops/trim.py)."""
    return extension.module().dispatch(buf.ep_state, x, x_scales, topk_idx, topk_weights,
                                       num_experts, expert_alignment, expand, num_sms)


def cached_dispatch(buf: BufferT, x, x_scales, handle, num_sms):
    return extension.module().cached_dispatch(buf.ep_state, x, x_scales, handle, num_sms)


def combine(buf: BufferT, x, handle, weights, num_sms):
    return extension.module().combine(buf.ep_state, x, handle, weights, num_sms)


def record_trimmed_handle(static_handle, trimmed_handle) -> None:
    """exact=True: the trimmed handle (deep_ep_ops/trim.py, run in Python on CUDA too) takes over
    the host-side record of the static one (csrc/torch/handle_records.hpp) with its own row
    count, so combine / cached_dispatch check it without a sync like any handle the C++ dispatch
    made. Nothing to do before the extension is loaded (no C++ dispatch has run)."""
    ext = extension.loaded()
    if ext is not None:
        ext.record_trimmed_handle(static_handle, trimmed_handle)
