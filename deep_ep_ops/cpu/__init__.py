"""Reference implementations over torch.distributed (gloo, CPU tensors).

They define the exact semantics the CUDA kernels must reproduce bit for bit and favour clarity
over speed:

* ``moe``: dispatch, cached_dispatch, combine (``routing``: where every row goes);
* ``engram``: engram_fetch and its backward;
* ``pp_cp``: pp_send_recv, cp_all_gather, cp_reduce_scatter;
* ``exchange``: every transfer between ranks, each peer waited for with the Buffer's
  ``timeout_s`` (``deep_ep_ops.errors`` names the peers that did not come).
"""
