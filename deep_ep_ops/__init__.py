"""deep_ep_ops: expert-parallel communication (MoE dispatch/combine, Engram fetch, PP
send/recv, CP all-gather/reduce-scatter) as ``torch.ops.deep_ep.*`` custom ops."""
from deep_ep_ops.buffer import Buffer, get_buffer
from deep_ep_ops.errors import PeerError, PeerMismatchError, PeerTimeoutError
from deep_ep_ops import ops  # noqa: F401  (registers torch.ops.deep_ep.*)
from deep_ep_ops.ops import (cached_dispatch, combine, cp_all_gather, cp_reduce_scatter,
                             dispatch, engram_fetch, pp_send_recv)

__all__ = ["Buffer", "get_buffer", "dispatch", "cached_dispatch", "combine", "engram_fetch",
           "pp_send_recv", "cp_all_gather", "cp_reduce_scatter", "PeerError",
           "PeerTimeoutError", "PeerMismatchError"]
__version__ = "0.1.0"
