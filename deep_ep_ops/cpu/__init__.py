"""Reference implementations over torch.distributed (gloo, CPU tensors).

They define the exact semantics the CUDA kernels must reproduce bit for bit and favour clarity
over speed:

* ``moe``: dispatch, cached_dispatch, combine on one host (``routing``: where every row goes);
* ``multihost``: the same ops on groups of several hosts (one host: ``moe``), composed of the
  inter-host stage (``interhost``: rows between rail peers) and ``moe``'s algorithm per host;
* ``engram``: engram_fetch and its backward;
* ``pp_cp``: pp_send_recv, cp_all_gather, cp_reduce_scatter;
* ``exchange``: every transfer between ranks, each peer waited for with the Buffer's
  ``timeout_s`` (``deep_ep_ops.errors`` names the peers that did not come).
"""
