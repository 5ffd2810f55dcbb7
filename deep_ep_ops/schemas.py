"""Every op schema of the ``deep_ep`` namespace, in one place."""
from __future__ import annotations

NAMESPACE = "deep_ep"

SCHEMAS: dict[str, str] = {
    "dispatch": (
        "dispatch(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, "
        "str group_name, int num_experts, int expert_alignment=1, bool expand=False, "
        "bool exact=False, int num_sms=0) "
        "-> (Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, "
        "Tensor recv_topk_weights, Tensor tokens_per_expert, Tensor handle)"
    ),
    # dispatch decomposes into these two: the collective always produces the static capacity
    # (no host sync); exact=True then trims to the real row count locally. Only the
    # collective is effectful, which keeps unbacked sizes out of effect tokens (Inductor cannot
    # lower an effectful op with data-dependent output sizes in torch 2.13).
    "_dispatch_static": (
        "_dispatch_static(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, "
        "str group_name, int num_experts, int expert_alignment, bool expand, int num_sms) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "_trim_dispatch": (
        "_trim_dispatch(Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, "
        "Tensor recv_topk_weights, Tensor tokens_per_expert, Tensor handle) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "cached_dispatch": (
        "cached_dispatch(Tensor x, Tensor? x_scales, Tensor handle, str group_name, "
        "int num_sms=0) -> (Tensor recv_x, Tensor recv_x_scales)"
    ),
    "combine": (
        "combine(Tensor x, Tensor handle, Tensor? weights, str group_name, int num_sms=0) "
        "-> Tensor"
    ),
    "engram_fetch": "engram_fetch(Tensor table, Tensor indices, str group_name) -> Tensor",
    "pp_send_recv": (
        "pp_send_recv(Tensor send, int dst, int src, SymInt[] recv_shape, "
        "ScalarType recv_dtype, str group_name) -> Tensor"
    ),
    "cp_all_gather": "cp_all_gather(Tensor x, str group_name) -> Tensor",
    "cp_reduce_scatter": "cp_reduce_scatter(Tensor x, str group_name) -> Tensor",
    # Private: the backward of engram_fetch. Sums every rank's row gradients into the owners'
    # shards (sparse, fixed order), so a sharded table is trainable.
    "_engram_scatter_add": (
        "_engram_scatter_add(Tensor grad, Tensor indices, str group_name, SymInt num_entries, "
        "SymInt hidden) -> Tensor"
    ),
}

# The CUDA backend's multi-host composition (deep_ep_ops/cuda/multihost.py): the C++ CUDA kernels
# of _dispatch_static / cached_dispatch / combine hand a Buffer whose group spans hosts to these
# through the dispatcher (they run the inter-host stage and the single-host kernels of the
# host's sub-Buffer). Same arguments and results as their public counterparts; the dispatch one
# also takes the wire (exact: counts first, then only real rows between hosts). Only CUDA
# kernels: nothing else calls them, so they are no part of the op contract.
MULTIHOST_SCHEMAS: dict[str, str] = {
    "_multihost_dispatch_static": (
        "_multihost_dispatch_static(Tensor x, Tensor? x_scales, Tensor topk_idx, "
        "Tensor topk_weights, str group_name, int num_experts, int expert_alignment, "
        "bool expand, int num_sms, bool exact_wire) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "_multihost_cached_dispatch": (
        "_multihost_cached_dispatch(Tensor x, Tensor? x_scales, Tensor handle, str group_name, "
        "int num_sms) -> (Tensor, Tensor)"
    ),
    "_multihost_combine": (
        "_multihost_combine(Tensor x, Tensor handle, Tensor? weights, str group_name, "
        "int num_sms) -> Tensor"
    ),
}

# Ops that talk to other ranks: none may be dropped or reordered by the compiler.
COMM_OPS = ("_dispatch_static", "cached_dispatch", "combine", "engram_fetch", "pp_send_recv",
            "cp_all_gather", "cp_reduce_scatter", "_engram_scatter_add")
