"""``Buffer``: the collective set-up every op refers to by ``group_name``.

Creating one registers it (deep_ep_ops.registry) under its group's name, so ops take a plain
string (what torch.compile, export and CUDA graphs handle) instead of a Python object.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from deep_ep_ops import hosts, registry
from deep_ep_ops.cuda.transport import TRANSPORTS  # names only: builds and loads nothing

DEFAULT_TIMEOUT_S = 30.0

# Sizes of the pp / cp windows when not given (each costs peer memory: pp R * pp_max_bytes,
# cp cp_max_bytes)
_DEFAULT_PP_MAX_BYTES = 16 << 20
_DEFAULT_PP_SLOTS = 4
_DEFAULT_CP_MAX_BYTES = 32 << 20


def get_buffer(group_name: str) -> "Buffer":
    """The Buffer registered for ``group_name``; a clear error when there is none."""
    return registry.get(group_name)


def _is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Buffer:
    """Communication state of one process group (collective: every rank constructs it).

    Args:
        group: the process group (gloo for CPU tensors, NCCL created with ``device_id=`` for
            CUDA tensors). ``None`` = the default group.
        num_max_tokens_per_rank: M, the most tokens any rank passes to ``dispatch``; the same on
            every rank. It sizes the static capacity ``R*M``.
        hidden: H, the row width of ``dispatch``'s ``x`` (``combine`` takes rows of width <= H).
        num_topk: K, columns of ``topk_idx``.
        num_experts: E, divisible by the group size; ``dispatch`` checks its argument against it.
        fp8_dispatch: reserve room for FP8 rows plus up to ceil(H/32) 4-byte scale packs.
        timeout_s: how long any rank waits for a peer inside an op. CUDA: the kernel gives up
            and the next call raises naming the peer. CPU: the op raises ``PeerTimeoutError``
            naming the op and the peers that did not enter it.
        pp_max_bytes: largest ``pp_send_recv`` message on CUDA (one copy-engine slot per
            source rank: costs R * pp_max_bytes of symmetric memory; 0 = small messages only).
        pp_slots: small ``pp_send_recv`` messages in flight per direction before the sender
            waits (on the GPU) for the receiver.
        cp_max_bytes: largest ``cp_all_gather`` input (per rank) / ``cp_reduce_scatter`` input
            on CUDA (symmetric memory; 0 = small inputs only).
        transport: how the CUDA backend's ranks reach each other's memory: ``"nccl"`` (an NCCL
            symmetric window; NCCL >= 2.28, one GPU per rank, all in one NCCL LSA team),
            ``"ipc"`` (CUDA IPC; any NCCL, ranks of one host, several per GPU under MPS) or
            ``"auto"`` (NCCL when its LSA team covers the group, else IPC when all ranks are on
            this host, else a ValueError: the group spans hosts). The same on every rank;
            ``buf.transport`` says which was taken (None on CPU).
        ranks_per_host: L, the ranks of each host (host h = ranks [h*L, (h+1)*L)); default:
            found from every rank's machine. Combine adds a token's partials inside each host,
            then the host sums in ascending host order, so L is part of the result's rounding;
            on several hosts the row order and the handle follow the multi-host algorithm
            (deep_ep_ops.cpu.multihost). Setting it simulates several hosts on one machine.
            On CUDA, several hosts run deep_ep_ops.cuda.multihost (NCCL between hosts, this
            host's sub-Buffer inside it) for dispatch / cached_dispatch / combine; pp / cp /
            engram need a group on one host there (NotImplementedError otherwise).
        direct_outputs: N >= 0 (CUDA, one host, R >= 2). N slots of peer memory, each the
            size of one compact dispatch at full capacity (R*M rows of the dispatch dtype:
            fp8 + scales when ``fp8_dispatch``, else bf16). An eager dispatch whose outputs
            fit a free slot returns ``recv_x`` / ``recv_scales`` that live in it, and the
            peers write their rows straight into them: the receiver's copy out of the staging
            rows disappears (a third of the dispatch's memory traffic). Compact outputs also
            return ``recv_topk_idx``, ``recv_topk_weights`` and the handle in it, which the
            peers write too (no epilogue kernel). A slot is free again when every output made
            in it is gone (a handle kept for backward keeps it); a dispatch that finds no free
            slot, whose outputs do not fit (wider x, expert-major layout with more rows), or
            that is captured in a CUDA graph stages its rows as with N = 0. Same results
            either way. Such outputs stay valid until ``destroy()`` (they are this Buffer's
            memory), and like any output are safe to drop on the dispatch's stream; one used
            on another stream must be synchronised before the stream's next dispatch.
            Default 0.
        zero_copy_combine: CUDA, one host, R >= 2: two slots of peer memory (each R*M rows of
            ``hidden`` bf16) that ``combine_input()`` hands out in turn. A ``combine`` whose
            ``x`` is such a tensor and that has no ``weights`` pushes nothing: the ranks that
            own the tokens read its rows in place (the same sums, bit for bit). Default False.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, *,
                 num_max_tokens_per_rank: int, hidden: int, num_topk: int, num_experts: int,
                 fp8_dispatch: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 pp_max_bytes: Optional[int] = None, pp_slots: Optional[int] = None,
                 cp_max_bytes: Optional[int] = None, transport: str = "auto",
                 ranks_per_host: Optional[int] = None, direct_outputs: int = 0,
                 zero_copy_combine: bool = False) -> None:
        if _is_capturing():
            raise RuntimeError("deep_ep_ops.Buffer cannot be created during CUDA graph capture; "
                               "create it before capturing")
        self.group = group if group is not None else dist.group.WORLD
        self.group_name: str = self.group.group_name
        self.rank: int = dist.get_rank(self.group)
        self.world_size: int = dist.get_world_size(self.group)
        for name, value, low in (("num_max_tokens_per_rank", num_max_tokens_per_rank, 1),
                                 ("hidden", hidden, 1), ("num_topk", num_topk, 1),
                                 ("num_experts", num_experts, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Buffer: {name} must be an int >= {low}, got {value!r}")
        if num_experts % self.world_size != 0:
            raise ValueError(f"Buffer: num_experts={num_experts} must be divisible by the group "
                             f"size {self.world_size}")
        if timeout_s <= 0:
            raise ValueError(f"Buffer: timeout_s must be > 0, got {timeout_s}")
        if not isinstance(direct_outputs, int) or direct_outputs < 0:
            raise ValueError(f"Buffer: direct_outputs must be an int >= 0, got {direct_outputs!r}")
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.num_topk = num_topk
        self.num_experts = num_experts
        self.fp8_dispatch = fp8_dispatch
        self.timeout_s = float(timeout_s)
        self.direct_outputs = direct_outputs
        self.zero_copy_combine = bool(zero_copy_combine)
        self.pp_max_bytes = _DEFAULT_PP_MAX_BYTES if pp_max_bytes is None else int(pp_max_bytes)
        self.pp_slots = _DEFAULT_PP_SLOTS if pp_slots is None else int(pp_slots)
        self.cp_max_bytes = _DEFAULT_CP_MAX_BYTES if cp_max_bytes is None else int(cp_max_bytes)
        if self.pp_max_bytes < 0 or self.cp_max_bytes < 0 or self.pp_slots < 1:
            raise ValueError(f"Buffer: pp_max_bytes and cp_max_bytes must be >= 0 and pp_slots "
                             f">= 1, got {pp_max_bytes}, {cp_max_bytes}, {pp_slots}")
        self.backend: str = dist.get_backend(self.group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if self.backend == "nccl" else torch.device("cpu"))
        if transport not in TRANSPORTS:
            raise ValueError(f"Buffer: transport must be one of {TRANSPORTS}, got {transport!r}")
        self.requested_transport = transport
        self.hosts: hosts.HostLayout = hosts.group_layout(self.group, ranks_per_host)
        self.id: int = registry.next_buffer_id()
        self.transport: Optional[str] = None
        self._engram: Optional[torch.Tensor] = None
        self._ep_state = None
        self._channel_state = None
        self.multihost = None  # CUDA on several hosts: deep_ep_ops.cuda.multihost state
        registry.add(self)
        try:
            if self.device.type == "cuda" and self.hosts.num_hosts > 1:
                if self.direct_outputs or self.zero_copy_combine:
                    raise ValueError(
                        f"Buffer: direct_outputs and zero_copy_combine need a group of one host; "
                        f"group {self.group_name!r} spans {self.num_hosts} hosts")
                from deep_ep_ops.cuda import multihost
                inner = Buffer(multihost.host_group(self), **multihost.sub_buffer_args(self))
                self.multihost = multihost.create(self, inner)
                self.transport = self.multihost.inner.transport
                registry.update(self)
            elif self.device.type == "cuda":
                from deep_ep_ops.cuda import channels, ep
                self._ep_state, peer_memory = ep.create_state(self)
                self._channel_state = channels.create_state(self, peer_memory)
                self.transport = peer_memory.name
                registry.update(self)
        except BaseException:
            # Release is collective and this rank cannot know how far its peers got: leak
            # what was made rather than wait for peers that may have failed elsewhere.
            registry.remove(self)
            self._ep_state = self._channel_state = self.multihost = None
            raise

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def ranks_per_host(self) -> int:
        return self.hosts.ranks_per_host

    @property
    def num_hosts(self) -> int:
        return self.hosts.num_hosts

    @property
    def device_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    @property
    def ep_state(self):
        """CUDA state of dispatch / cached_dispatch / combine (its peer-memory window)."""
        if self.multihost is not None:
            raise RuntimeError(f"group {self.group_name!r} spans {self.num_hosts} hosts: its "
                               "CUDA EP state is its host's sub-Buffer's "
                               "(buf.multihost.inner.ep_state)")
        if self._ep_state is None:
            raise RuntimeError(f"group {self.group_name!r} ({self.backend}) has no CUDA state: "
                               "CUDA tensors need a Buffer on an NCCL group")
        return self._ep_state

    def ep_state_or_none(self):
        return self._ep_state

    @property
    def channel_state(self):
        """CUDA state of pp_send_recv / cp_* / engram_* (a peer-memory window of their own)."""
        if self.multihost is not None:
            raise NotImplementedError(
                f"group {self.group_name!r} spans {self.num_hosts} hosts: pp_send_recv, cp_* "
                "and engram_* run on CUDA within one host only; make their Buffer on a group "
                "of one host's ranks")
        if self._channel_state is None:
            raise RuntimeError(f"group {self.group_name!r} ({self.backend}) has no CUDA state: "
                               "CUDA tensors need a Buffer on an NCCL group")
        return self._channel_state

    def cp_input(self, shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """CUDA: a view of this rank's slot of the copy-engine ``cp_all_gather``. Write the
        input there and pass the view to ``cp_all_gather`` to skip its staging copy. Valid
        until the next cp op on this Buffer (which may overwrite it); CPU: a new tensor."""
        if self.device.type != "cuda":
            return torch.empty(tuple(shape), dtype=dtype)
        from deep_ep_ops.cuda import channels
        return channels.cp_input(self, shape, dtype)

    def combine_input(self, num_rows: int, width: Optional[int] = None,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """CUDA (``Buffer(zero_copy_combine=True)``): a ``[num_rows, width]`` tensor (width
        defaults to ``hidden``) at the start of the next of the Buffer's two combine-input
        slots. Write the expert outputs there (e.g. ``out=`` of a matmul) and pass it as
        ``combine``'s ``x`` without ``weights``: the peers read its rows in place instead of
        receiving pushed partials. A slot is handed out again two calls later: use the tensor
        in its ``combine`` before asking for the one after next. CPU: a new tensor."""
        width = self.hidden if width is None else width
        if not isinstance(num_rows, int) or num_rows < 0 or not isinstance(width, int) or width < 1:
            raise ValueError(f"Buffer.combine_input: num_rows must be an int >= 0 and width an int "
                             f">= 1, got {num_rows!r}, {width!r}")
        if self.device.type != "cuda":
            return torch.empty(num_rows, width, dtype=dtype)
        from deep_ep_ops.cuda import ep
        return ep.combine_input(self, num_rows, width, dtype)

    def engram_table(self, num_entries_per_rank: int, hidden: int,
                     dtype: torch.dtype = torch.bfloat16,
                     max_fetch_rows: Optional[int] = None) -> torch.Tensor:
        """Allocate this rank's shard ``[num_entries_per_rank, hidden]`` of an Engram table
        (in symmetric memory on CUDA, zero-filled). Collective. ``engram_fetch`` accepts only
        this tensor (or a tensor sharing its storage, such as an ``nn.Parameter`` made from it).

        ``max_fetch_rows`` (CUDA): the most rows (N*L) one ``engram_fetch`` whose gradient is
        taken may read on a rank; it sizes the backward's staging (default 32 rows per token of
        ``num_max_tokens_per_rank``). The shard stays valid until ``destroy()``."""
        if num_entries_per_rank < 1 or hidden < 1:
            raise ValueError(f"engram_table: num_entries_per_rank and hidden must be >= 1, got "
                             f"{num_entries_per_rank}, {hidden}")
        if self.device.type == "cuda":
            from deep_ep_ops.cuda import channels
            table = channels.engram_table(self, num_entries_per_rank, hidden, dtype,
                                          max_fetch_rows)
        else:
            table = torch.zeros(num_entries_per_rank, hidden, dtype=dtype)
        self._engram = table
        return table

    def check_engram_table(self, table: torch.Tensor) -> None:
        """Raise unless ``table`` matches the shard ``engram_table`` returned on this Buffer.

        On CUDA the table must be that very shard (its memory is the symmetric window peers
        read from, zero-copy). The CPU reference reads tables by value, so there it must match
        the shard's shape and dtype (opcheck and gradcheck pass copies of it).
        """
        ref = self._engram
        if ref is None:
            raise ValueError(f"deep_ep.engram_fetch: group {self.group_name!r} has no Engram "
                             "table; allocate it with buf.engram_table(...)")
        same_kind = table.shape == ref.shape and table.dtype == ref.dtype
        same_memory = table.data_ptr() == ref.data_ptr()
        if not same_kind or (table.is_cuda and not same_memory):
            raise ValueError(
                f"deep_ep.engram_fetch: table must be the registered shard {tuple(ref.shape)} "
                f"{ref.dtype} from buf.engram_table(); got another tensor {tuple(table.shape)} "
                f"{table.dtype}")

    def destroy(self) -> None:
        """Free the peer memory and unregister. Collective: call it on every rank, before
        destroy_process_group."""
        registry.remove(self)
        self._release_states()
        # Let go of the process group: a gloo group still referenced when the interpreter
        # exits is destructed after its worker threads' owners are gone, and the process
        # aborts ("terminate called without an active exception") after destroy_process_group.
        self.group = None

    def _release_states(self) -> None:
        if self.multihost is not None:
            self.multihost.destroy()
            self.multihost = None
        if self._channel_state is not None:
            from deep_ep_ops.cuda import channels
            channels.destroy_state(self._channel_state)  # frees the Engram tables too
            self._channel_state = None
        if self._ep_state is not None:
            from deep_ep_ops.cuda import ep
            ep.destroy_state(self._ep_state)
            self._ep_state = None
        self._engram = None

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (f"Buffer(group={self.group_name!r}, R={self.world_size}, "
                f"M={self.num_max_tokens_per_rank}, H={self.hidden}, K={self.num_topk}, "
                f"E={self.num_experts}, backend={self.backend}, transport={self.transport})")
