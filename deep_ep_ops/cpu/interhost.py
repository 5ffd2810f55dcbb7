"""The inter-host stage of multi-host EP: rows between rail peers.

Rank ``(h, l)`` (host h, local index l; group rank ``h*L + l``) talks across hosts only to its
*rail peers* ``(h', l)``, the ranks with the same local index on the other hosts. Everything
that crosses a host boundary goes through one ``InterHostStage``:

* ``exchange_rows`` (dispatch, cached_dispatch): to each other host, the rows of this rank's
  tokens that have an expert there, one row per (token, host);
* ``return_partials`` (combine): to each other host, the fp32 host partials of the rows that
  host's rail peer sent here.

Two wires, same results bit for bit (only what crosses differs):

* ``"static"``: always ``M`` rows per (source rank, destination host), padding included: sizes
  known without looking at the data (what a CUDA graph needs);
* ``"exact"``: only the real rows. For dispatch the receiver cannot know how many come, so the
  counts go first (one int64 per rail pair), then the rows; cached_dispatch and combine know
  the counts from the handle and send only the rows.

Which wire: ``dispatch(exact=True)`` runs its collective under ``wire("exact")`` (the composite
``deep_ep_ops.ops._dispatch`` sets it; a compiled graph, where the composite was traced away,
runs the static wire); cached_dispatch and combine take the exact wire when their handle was
trimmed below the static capacity (``multihost._wire_for``), else the static one.

This module is the CPU reference's stage: gloo point-to-point messages over the Buffer's own
group (``deep_ep_ops.cpu.exchange``, with its timeouts), in ``N - 1`` rounds (round i: to host
``h + i``, from host ``h - i``, mod N). The CUDA stage will be NCCL grouped ``ncclSend`` /
``ncclRecv`` on the group's communicator (one group call for all rail peers), and later NCCL's
GIN (device-initiated puts); both keep this interface.

Every message a stage sends is recorded in the Buffer's ``WireLog`` (``wire_log(buf)``), which
the tests and ``bench/bench_multihost.py`` read: rows and payload bytes per (source host,
destination host).
"""
from __future__ import annotations

import contextlib
from collections import deque
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch

from deep_ep_ops.cpu.exchange import send_recv_parts

WIRES = ("static", "exact")
_WIRE: ContextVar[str] = ContextVar("deep_ep_ops_inter_host_wire", default="static")


@contextlib.contextmanager
def wire(mode: str) -> Iterator[None]:
    """Run the enclosed dispatches with this wire. ``dispatch(exact=True)`` runs its collective
    under ``wire("exact")``; everything else defaults to ``"static"``."""
    if mode not in WIRES:
        raise ValueError(f"inter-host wire must be one of {WIRES}, got {mode!r}")
    token = _WIRE.set(mode)
    try:
        yield
    finally:
        _WIRE.reset(token)


def current_wire() -> str:
    return _WIRE.get()


@dataclass(frozen=True)
class Transfer:
    """One message a rank sent to a rail peer: ``rows`` rows of ``bytes`` payload bytes
    (``kind``: ``"rows"`` dispatch direction, ``"partials"`` combine direction, ``"counts"``
    the exact wire's count message)."""
    op: str
    kind: str
    src_host: int
    dst_host: int
    src_rank: int
    dst_rank: int
    rows: int
    bytes: int


# A log keeps the latest transfers only (each op adds at most 2(N-1)), so a long run on the CPU
# reference does not grow it without bound.
LOG_LIMIT = 1 << 14


@dataclass
class WireLog:
    """What this rank's inter-host stage sent, latest ``LOG_LIMIT`` transfers in order
    (``clear()`` before the calls to count)."""
    transfers: deque = field(default_factory=lambda: deque(maxlen=LOG_LIMIT))

    def clear(self) -> None:
        self.transfers.clear()

    def totals(self, op: Optional[str] = None, kind: Optional[str] = None,
               what: str = "rows") -> dict[tuple[int, int], int]:
        """Rows (``what="rows"``) or bytes (``"bytes"``) per (source host, destination
        host), summed over the transfers of ``op`` and ``kind`` (None: all)."""
        out: dict[tuple[int, int], int] = {}
        for t in self.transfers:
            if (op is None or t.op == op) and (kind is None or t.kind == kind):
                key = (t.src_host, t.dst_host)
                out[key] = out.get(key, 0) + getattr(t, what)
        return out


_LOGS: dict[int, WireLog] = {}


def wire_log(buf) -> WireLog:
    """The WireLog of ``buf`` on this rank (one per Buffer id)."""
    return _LOGS.setdefault(buf.id, WireLog())


def _nbytes(parts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts)


def _pad_rows(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """``t`` padded along dim 0 to ``rows`` with ``fill``."""
    out = torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype)
    out[:t.shape[0]] = t
    return out


class InterHostStage(ABC):
    """Moves rows between this rank and its rail peers on the other hosts.

    ``rows_by_host`` / ``partials_by_host`` map every other host to what goes there: parts of
    ``n <= M`` rows each. Results map every other host to what came from there: ``M`` rows per
    part on the static wire, the real ``n`` on the exact wire.
    """

    def __init__(self, buf, wire_mode: str) -> None:
        if wire_mode not in WIRES:
            raise ValueError(f"inter-host wire must be one of {WIRES}, got {wire_mode!r}")
        self.buf = buf
        self.wire = wire_mode
        self.num_hosts = buf.hosts.num_hosts
        self.ranks_per_host = buf.hosts.ranks_per_host
        self.host, self.local = divmod(buf.rank, self.ranks_per_host)
        self.max_rows = buf.num_max_tokens_per_rank

    def rail_peer(self, host: int) -> int:
        """The group rank of this rank's rail peer on ``host``."""
        return host * self.ranks_per_host + self.local

    def where(self, rank: Optional[int] = None) -> str:
        """``rank r (host h, local index l)`` for error messages (this rank by default)."""
        rank = self.buf.rank if rank is None else rank
        h, l = divmod(rank, self.ranks_per_host)
        return f"rank {rank} (host {h}, local index {l})"

    @abstractmethod
    def exchange_rows(self, op: str, rows_by_host: Mapping[int, Sequence[torch.Tensor]],
                      fills: Sequence[float],
                      expect: Optional[Mapping[int, int]] = None
                      ) -> dict[int, list[torch.Tensor]]:
        """Dispatch direction. ``fills``: the padding value of each part on the static wire
        (-1 for expert ids, 0 otherwise). ``expect``: the rows each host sends here when the
        handle says so (cached_dispatch); None (dispatch): the exact wire sends counts first."""

    @abstractmethod
    def return_partials(self, op: str, partials_by_host: Mapping[int, torch.Tensor],
                        expect: Mapping[int, int]) -> dict[int, torch.Tensor]:
        """Combine direction: host partials ``[n, H']`` in the accumulation dtype back to the
        rail peers whose rows they sum; ``expect``: the rows each host returns here."""


class GlooRailStage(InterHostStage):
    """The CPU reference's stage: gloo messages over the Buffer's group, one round per host
    distance (every rail pair in a round is disjoint, so no round waits on another's peer)."""

    def _rounds(self) -> Iterator[tuple[int, int]]:
        """(destination host, source host) of each round."""
        N, h = self.num_hosts, self.host
        for i in range(1, N):
            yield (h + i) % N, (h - i) % N

    def _log(self, op: str, kind: str, dst_host: int, rows: int, nbytes: int) -> None:
        wire_log(self.buf).transfers.append(Transfer(
            op, kind, self.host, dst_host, self.buf.rank, self.rail_peer(dst_host), rows, nbytes))

    def _swap(self, op: str, kind: str, parts_by_host: Mapping[int, Sequence[torch.Tensor]],
              fills: Sequence[float],
              expect: Optional[Mapping[int, int]]) -> dict[int, list[torch.Tensor]]:
        counts = {h: int(parts[0].shape[0]) for h, parts in parts_by_host.items()}
        if self.wire == "exact" and expect is None:
            # counts first: the receiver learns how many rows follow
            expect = {}
            for dst, src in self._rounds():
                got = send_recv_parts(self.buf, op, [torch.tensor([counts[dst]])],
                                      self.rail_peer(dst), self.rail_peer(src))
                self._log(op, "counts", dst, 0, 8)
                expect[src] = int(got[0][0])
        received: dict[int, list[torch.Tensor]] = {}
        for dst, src in self._rounds():
            parts = list(parts_by_host[dst])
            if self.wire == "static":
                parts = [_pad_rows(p, self.max_rows, f) for p, f in zip(parts, fills)]
            got = send_recv_parts(self.buf, op, parts, self.rail_peer(dst),
                                  self.rail_peer(src))
            self._log(op, kind, dst, int(parts[0].shape[0]), _nbytes(parts))
            self._check(op, src, parts, got, expect)
            received[src] = got
        return received

    def _check(self, op: str, src: int, mine: Sequence[torch.Tensor],
               got: Sequence[torch.Tensor], expect: Optional[Mapping[int, int]]) -> None:
        peer = self.where(self.rail_peer(src))
        if len(got) != len(mine) or any(a.dtype != b.dtype or a.shape[1:] != b.shape[1:]
                                        for a, b in zip(mine, got)):
            raise ValueError(
                f"deep_ep.{op}: {self.where()} got rows of another kind from its rail peer "
                f"{peer}: {[(tuple(t.shape), str(t.dtype)) for t in got]}, sends "
                f"{[(tuple(t.shape), str(t.dtype)) for t in mine]} (x_scales given on some "
                "ranks only, or other dtypes / widths on different hosts)")
        want = self.max_rows if self.wire == "static" else \
            (expect[src] if expect is not None else None)
        if want is not None and int(got[0].shape[0]) != want:
            raise ValueError(
                f"deep_ep.{op}: {self.where()} expected {want} rows from its rail peer {peer} "
                f"({self.wire} wire), got {int(got[0].shape[0])} (a handle of another "
                "dispatch on one of the two ranks?)")

    def exchange_rows(self, op, rows_by_host, fills, expect=None):
        return self._swap(op, "rows", rows_by_host, fills, expect)

    def return_partials(self, op, partials_by_host, expect):
        got = self._swap(op, "partials", {h: [p] for h, p in partials_by_host.items()}, (0,),
                         expect)
        return {h: parts[0] for h, parts in got.items()}


def make_stage(buf, wire_mode: Optional[str] = None) -> InterHostStage:
    """The stage the CPU reference's ops use (the current ``wire`` unless given)."""
    return GlooRailStage(buf, wire_mode or current_wire())
