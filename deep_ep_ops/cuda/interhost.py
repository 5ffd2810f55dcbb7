"""The CUDA inter-host stage: rows between rail peers over NCCL (csrc/interhost/).

Rank ``(h, l)`` (group rank ``h*L + l``) talks across hosts only to its rail peers ``(h', l)``,
as in the CPU reference (``deep_ep_ops.cpu.interhost``). The stage owns one NCCL communicator
over its rail (rail rank = host), made from an ``ncclUniqueId`` that rail rank 0 (group rank
``l``) creates and the group all-gathers, as the IPC transport exchanges its handles.

Data is laid out in per-host slots: ``send[h']`` holds what goes to host h', ``recv[h'']``
receives what comes from host h'' (tensors ``[N, M, ...]``; the own host's slot is neither sent
nor written). Static wire: every slot's ``M`` rows cross (sizes fixed: CUDA-graph capturable).
Exact wire: ``counts`` first (one int64 per rail pair over NCCL, then one stream sync to read
them), then only the first ``rows[h]`` rows of each slot.

A multi-host Buffer makes its stage with ``for_buffer`` (deep_ep_ops.cuda.multihost moves the
per-host slots through it); the stage itself takes only the group and its ``HostLayout``, so
``tests/gpu/test_interhost_gpu.py`` drives it without a Buffer.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from deep_ep_ops.cuda import extension, transport
from deep_ep_ops.cuda.stall_watch import StallWatch
from deep_ep_ops.hosts import HostLayout

DEFAULT_TIMEOUT_S = 30.0


class RailStage:
    """One rank's inter-host stage (collective to create and to destroy over the group)."""

    def __init__(self, group: dist.ProcessGroup, layout: HostLayout,
                 device: Optional[torch.device] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank = dist.get_rank(group)
        self.layout = layout
        if dist.get_world_size(group) != layout.num_hosts * layout.ranks_per_host:
            raise ValueError(f"inter-host stage: a group of {dist.get_world_size(group)} ranks "
                             f"is not {layout.num_hosts} hosts of {layout.ranks_per_host}")
        self.host, self.local = divmod(self.rank, layout.ranks_per_host)
        self.num_hosts = layout.num_hosts
        self.device = device if device is not None else \
            torch.device("cuda", torch.cuda.current_device())
        index = self.device.index if self.device.index is not None else \
            (torch.cuda.current_device() if self.device.type == "cuda" else 0)
        ext = extension.module()
        gather = transport.bytes_all_gather(group)
        # Rail l's rank 0 is host 0's rank l, i.e. group rank l: it makes the id.
        ids = gather(ext.nccl_rail_unique_id() if self.host == 0 else b"")
        failure = ""
        self._stage = None
        try:
            self._stage = ext.nccl_rail_stage(ids[self.local], self.rank, layout.num_hosts,
                                              layout.ranks_per_host, index)
        except (RuntimeError, ValueError) as exc:  # NCCL errors, a missing id
            failure = str(exc)
        # Every rank learns every failure, so none goes on to use a half-made stage.
        outcomes = gather(failure.encode())
        bad = [f"rank {r}: {o.decode()}" for r, o in enumerate(outcomes) if o]
        if bad:
            raise RuntimeError("deep_ep_ops: creating the inter-host stage failed (" +
                               "; ".join(bad) + ")")
        self._recv_counts = torch.zeros(self.num_hosts, dtype=torch.int64, device=self.device)
        # NCCL has no timeout of its own here: a rail peer that never posts its side is
        # reported (host and rank) by the watch, which then aborts the rail (the pending
        # transfers end; every later call raises the report)
        self.watch = StallWatch(timeout_s, on_stall=self._stage.abort, on_thread_start=(
            ext.relax_capture_mode_for_this_thread if self.device.type == "cuda" else None))
        if self.device.type == "cuda":
            self._connect()

    def _connect(self) -> None:
        """NCCL connects a rail pair at its first transfer, inside the enqueuing call, which
        then waits on the host until the peer enqueues too. Connect here, where every rank is
        (creation is collective): a peer that comes late to an op then shows as a pending
        transfer that the watch reports, not as an op stuck on the host in NCCL."""
        probe = torch.zeros(self.num_hosts, 1 << 20, dtype=torch.uint8, device=self.device)
        self._stage.exchange_rows("connect", self._parts([probe], [torch.empty_like(probe)],
                                                         None, None))
        torch.cuda.synchronize(self.device)

    def _waiting_for(self, op: str) -> str:
        L = self.layout.ranks_per_host
        peers = ", ".join(f"host {h} (rank {h * L + self.local})" for h in self.peers())
        return (f"deep_ep.{op}: rank {self.rank} (host {self.host}, local index {self.local}) "
                f"waits for its rail peers on {peers}")

    def _capturing(self) -> bool:
        # (a CPU stand-in of the extension in the glue tests has no stream)
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _transfer(self, op: str, enqueue, parts) -> None:
        """Enqueue one transfer of ``parts`` and follow it on the current stream (not while
        capturing: a captured transfer runs at replay, and no completion test is allowed)."""
        capturing = self._capturing()
        self.watch.raise_if_stalled(query=not capturing)
        enqueue(op, parts)
        if self.device.type != "cuda" or capturing:
            return
        done = torch.cuda.Event()
        done.record()
        self.watch.track(done.query, self._waiting_for(op))

    def peers(self) -> list[int]:
        """The other hosts, ascending."""
        return [h for h in range(self.num_hosts) if h != self.host]

    def _parts(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor],
               send_rows: Optional[Sequence[int]], recv_rows: Optional[Sequence[int]]):
        if len(send) != len(recv):
            raise ValueError(f"inter-host stage: {len(send)} tensors sent, {len(recv)} received")
        parts = []
        for h in self.peers():
            for s, r in zip(send, recv):
                if s.shape[0] != self.num_hosts or r.shape[0] != self.num_hosts:
                    raise ValueError(f"inter-host stage: slot tensors need {self.num_hosts} "
                                     f"host slots in dim 0, got {tuple(s.shape)} and "
                                     f"{tuple(r.shape)}")
                s_h = s[h] if send_rows is None else s[h, :int(send_rows[h])]
                r_h = r[h] if recv_rows is None else r[h, :int(recv_rows[h])]
                parts.append((h, s_h, r_h))
        return parts

    def exchange_rows(self, op: str, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor],
                      send_rows: Optional[Sequence[int]] = None,
                      recv_rows: Optional[Sequence[int]] = None) -> None:
        """Dispatch direction: slot h' of every ``send`` tensor to host h''s rail peer. Rows
        None: whole slots (static wire); else the first ``rows[h]`` rows (exact wire)."""
        self._transfer(op, self._stage.exchange_rows,
                       self._parts(send, recv, send_rows, recv_rows))

    def return_partials(self, op: str, send: Sequence[torch.Tensor],
                        recv: Sequence[torch.Tensor],
                        send_rows: Optional[Sequence[int]] = None,
                        recv_rows: Optional[Sequence[int]] = None) -> None:
        """Combine direction, same slots and rows as ``exchange_rows``."""
        self._transfer(op, self._stage.return_partials,
                       self._parts(send, recv, send_rows, recv_rows))

    def counts(self, op: str, send_counts: torch.Tensor) -> tuple[list[int], list[int]]:
        """The exact wire's first message: ``send_counts[h']`` (int64 ``[N]`` on the device) to
        each rail peer; returns (sent, received) counts per host on the host (one sync; the
        own host's entries 0)."""
        self.watch.raise_if_stalled()
        finished = threading.Event()  # the call blocks in its sync: watch it from outside
        self.watch.track(finished.is_set, self._waiting_for(op))
        try:
            sent, received = self._stage.counts_to_host(op, send_counts, self._recv_counts)
        finally:
            finished.set()
        return list(sent), list(received)

    @property
    def alive(self) -> bool:
        return self._stage is not None and self._stage.alive

    def destroy(self) -> None:
        """Collective over the rail: finalize and free the communicator (drop CUDA graphs that
        captured its transfers first)."""
        if self._stage is not None and self._stage.alive and self.device.type == "cuda":
            # no transfer of ours still queued on any stream (one that stalls is aborted by
            # the watch meanwhile, which leaves nothing to finalize)
            torch.cuda.synchronize(self.device)
        self.watch.stop()
        if self._stage is not None and self._stage.alive:
            self._stage.destroy()


def rail_stage(group: dist.ProcessGroup, layout: HostLayout,
               device: Optional[torch.device] = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> RailStage:
    """The inter-host stage of this rank of ``group`` (collective over the group)."""
    return RailStage(group, layout, device, timeout_s)


def for_buffer(buf) -> RailStage:
    """The stage of a Buffer whose hosts are known (``buf.hosts``; its ``timeout_s`` for the
    stall reports); collective."""
    return RailStage(buf.group, buf.hosts, buf.device, buf.timeout_s)
