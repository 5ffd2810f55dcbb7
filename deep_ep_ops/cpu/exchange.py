"""Every transfer between ranks of the CPU reference backend: point-to-point messages over the
Buffer's gloo group, each peer waited for on its own, against a deadline of ``timeout_s``.

One exchange sends this rank's tensors (its "parts") to some peers and receives theirs. To
each peer go two messages: a fixed-size header (a magic number, the op, the Buffer's M, H, K
and E, each part's dtype and shape, the payload size), then the payload (every part's bytes,
each padded to 16 bytes so it can be viewed as its dtype again). Hence:

* a peer that does not enter the op within ``timeout_s`` is named on every rank waiting for
  it (``PeerTimeoutError``). gloo closes the connection to a peer it timed out on, so the late
  peer fails at once (``PeerError``) when it next talks to this rank instead of hanging;
* a peer that entered another op, or whose Buffer has other sizes, is named too
  (``PeerMismatchError``, ``ValueError``), after its messages are in, so the connections stay
  clean;
* parts of any size travel in one round: the header says how many bytes follow.

The messages use a tag of their own, apart from the users' point-to-point traffic (tag 0).
"""
from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from deep_ep_ops.errors import PeerError, PeerMismatchError, PeerTimeoutError

TAG = 0xDEE9
MAGIC = 0x646565705F6F7073  # "deep_ops"
# After the deadline every peer still gets this long: its messages may be in already.
GRACE_S = 0.1
# The reference functions also run with a stand-in for the Buffer that carries only group,
# rank, world_size and group_name (the GPU tests' CPU reference); it keeps gloo's default wait.
STAND_IN_TIMEOUT_S = 1800.0

OPS = ("dispatch", "cached_dispatch", "combine", "engram_fetch", "engram_fetch backward",
       "pp_send_recv", "cp_all_gather", "cp_reduce_scatter")
CONFIG_FIELDS = ("num_max_tokens_per_rank", "hidden", "num_topk", "num_experts")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
          torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32,
          torch.uint64)
MAX_PARTS = 4
MAX_DIMS = 8
# header fields (int64): magic, op, the Buffer's config, part count, payload bytes, then per
# part its dtype code, ndim and dims
_H_MAGIC, _H_OP, _H_CONFIG = 0, 1, 2
_H_NUM_PARTS = _H_CONFIG + len(CONFIG_FIELDS)
_H_PAYLOAD_BYTES = _H_NUM_PARTS + 1
_H_PARTS = _H_PAYLOAD_BYTES + 1
_PART_FIELDS = 2 + MAX_DIMS
HEADER_LEN = _H_PARTS + MAX_PARTS * _PART_FIELDS
_ALIGN = 16


@dataclass(frozen=True)
class _Context:
    group: dist.ProcessGroup
    rank: int
    world_size: int
    group_name: str
    timeout_s: float
    config: tuple[int, ...]


def _context(buf) -> _Context:
    return _Context(buf.group, buf.rank, buf.world_size, buf.group_name,
                    float(getattr(buf, "timeout_s", STAND_IN_TIMEOUT_S)),
                    tuple(int(getattr(buf, f, 0)) for f in CONFIG_FIELDS))


# -- messages --------------------------------------------------------------------------------

def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _pack(ctx: _Context, op: str, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(header [HEADER_LEN] int64, payload uint8) of ``parts``."""
    if len(parts) > MAX_PARTS:
        raise ValueError(f"deep_ep.{op}: at most {MAX_PARTS} tensors per exchange")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[:_H_NUM_PARTS] = torch.tensor([MAGIC, OPS.index(op), *ctx.config])
    chunks = []
    for i, t in enumerate(parts):
        if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
            raise ValueError(f"deep_ep.{op}: the CPU reference cannot send a {t.dim()}-D "
                             f"{t.dtype} tensor (dtypes {DTYPES}, at most {MAX_DIMS} dims)")
        at = _H_PARTS + i * _PART_FIELDS
        header[at:at + 2 + t.dim()] = torch.tensor([DTYPES.index(t.dtype), t.dim(), *t.shape])
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        chunks.append(raw)
        if _padded(raw.numel()) > raw.numel():
            chunks.append(torch.zeros(_padded(raw.numel()) - raw.numel(), dtype=torch.uint8))
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    header[_H_NUM_PARTS] = len(parts)
    header[_H_PAYLOAD_BYTES] = payload.numel()
    return header, payload


def _op_of(header: torch.Tensor) -> str:
    code = int(header[_H_OP])
    return OPS[code] if 0 <= code < len(OPS) else f"<op {code}>"


def _config_of(header: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in header[_H_CONFIG:_H_NUM_PARTS])


def _payload_bytes(header: torch.Tensor) -> int:
    return int(header[_H_PAYLOAD_BYTES])


def _unpack(header: torch.Tensor, payload: torch.Tensor) -> list[torch.Tensor]:
    parts, offset = [], 0
    for i in range(int(header[_H_NUM_PARTS])):
        at = _H_PARTS + i * _PART_FIELDS
        dtype, ndim = DTYPES[int(header[at])], int(header[at + 1])
        shape = tuple(int(v) for v in header[at + 2:at + 2 + ndim])
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        raw = payload[offset:offset + nbytes]
        parts.append(raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype))
        offset += _padded(nbytes)
    return parts


# -- waiting ---------------------------------------------------------------------------------

def _gloo_text(exc: BaseException) -> str:
    """gloo's message without its source location and torch's generic advice."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0])
    return text.split(". This is typically")[0]


def _is_timeout(exc: BaseException) -> bool:
    return "Timed out" in str(exc)


class _Waits:
    """The posted messages of one exchange and the peers that failed so far.

    gloo facts this relies on: a wait that times out closes every connection of the group on
    this rank; a message completed before that still waits out fine afterwards; a second wait
    on a completed message blocks (so each message is waited for once)."""

    def __init__(self, ctx: _Context, op: str) -> None:
        self.ctx, self.op = ctx, op
        self.pending: list[dist.Work] = []
        self.missing: set[int] = set()
        self.broken: dict[int, str] = {}
        self.timed_out = False

    def send(self, tensor: torch.Tensor, peer: int) -> Optional[dist.Work]:
        return self._post(dist.isend, tensor, group_dst=peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> Optional[dist.Work]:
        return self._post(dist.irecv, tensor, group_src=peer)

    def _post(self, post, tensor: torch.Tensor, **peer: int) -> Optional[dist.Work]:
        rank = next(iter(peer.values()))
        if rank in self.broken:
            return None
        try:
            work = post(tensor, group=self.ctx.group, tag=TAG, **peer)
        except RuntimeError as exc:  # the connection is closed already
            self.broken[rank] = _gloo_text(exc)
            return None
        self.pending.append(work)
        return work

    def wait(self, peer: int, work: Optional[dist.Work], deadline: float) -> bool:
        """Wait for one message; False when the peer missed the deadline or failed."""
        if work is None or peer in self.broken or peer in self.missing:
            return False
        self.pending.remove(work)
        try:
            work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), GRACE_S)))
            return True
        except RuntimeError as exc:
            # after a timeout every unfinished message fails: its peer had not arrived either
            if _is_timeout(exc) or self.timed_out:
                self.timed_out = True
                self.missing.add(peer)
            else:
                self.broken[peer] = _gloo_text(exc)
            return False

    def raise_if_failed(self) -> None:
        if not self.missing and not self.broken:
            return
        # Whatever is still pending is abandoned: a short wait makes gloo close the group's
        # connections (if a timeout has not already), so no late message can land in a later
        # exchange and the late peers fail when they next talk to this rank.
        for work in self.pending:
            try:
                work.wait(datetime.timedelta(milliseconds=1))
            except RuntimeError:
                pass
        self.pending = []
        ctx, op = self.ctx, self.op
        where = f"deep_ep.{op}: rank {ctx.rank}"
        advice = "destroy this Buffer and the process group"
        missing = sorted(self.missing - set(self.broken))
        if self.broken:
            detail = "; ".join(f"rank {p}: {text}" for p, text in sorted(self.broken.items()))
            late = f"; rank(s) {missing} did not arrive within {ctx.timeout_s:g} s" \
                if missing else ""
            raise PeerError(
                f"{where} lost the connection to rank(s) {sorted(self.broken)} of group "
                f"{ctx.group_name!r} (a peer exited, or an earlier timeout closed the "
                f"connection){late}; {advice}. gloo: {detail}",
                op=op, rank=ctx.rank, peers=sorted(self.broken) + missing,
                group_name=ctx.group_name)
        raise PeerTimeoutError(
            f"{where} waited {ctx.timeout_s:g} s (Buffer timeout_s) for rank(s) {missing} of "
            f"group {ctx.group_name!r}, which did not enter the same call (skipped it, stuck "
            f"elsewhere, or slower than the timeout); the connection to them is closed: "
            f"{advice}", op=op, rank=ctx.rank, peers=missing, group_name=ctx.group_name)


def _exchange(ctx: _Context, op: str, parts: Sequence[torch.Tensor], send_to: list[int],
              recv_from: list[int]) -> dict[int, list[torch.Tensor]]:
    """Send ``parts`` to every rank of ``send_to``; the parts of every rank of ``recv_from``."""
    header, payload = _pack(ctx, op, parts)
    waits = _Waits(ctx, op)
    headers = {p: torch.empty(HEADER_LEN, dtype=torch.int64) for p in recv_from}
    header_works = {p: waits.recv(headers[p], p) for p in recv_from}
    send_works = []
    for p in send_to:
        send_works.append((p, waits.send(header, p)))
        if payload.numel():
            send_works.append((p, waits.send(payload, p)))

    deadline = time.monotonic() + ctx.timeout_s
    payloads, payload_works = {}, {}
    for p in recv_from:
        if not waits.wait(p, header_works[p], deadline):
            continue
        if int(headers[p][_H_MAGIC]) != MAGIC:
            waits.broken[p] = f"sent a message that is not a deep_ep_ops header on tag {TAG}"
            continue
        payloads[p] = torch.empty(_payload_bytes(headers[p]), dtype=torch.uint8)
        if payloads[p].numel():
            payload_works[p] = waits.recv(payloads[p], p)
    waits.raise_if_failed()

    deadline = time.monotonic() + ctx.timeout_s
    for p, work in payload_works.items():
        waits.wait(p, work, deadline)
    for p, work in send_works:
        waits.wait(p, work, deadline)
    waits.raise_if_failed()

    # Every message is in: what follows leaves the connections ready for the next op.
    others = {p: _op_of(h) for p, h in headers.items() if _op_of(h) != op}
    if others:
        peers = sorted(others)
        entered = ", ".join(f"rank {p} entered deep_ep.{others[p]}" for p in peers)
        raise PeerMismatchError(
            f"deep_ep.{op}: {entered} while rank {ctx.rank} entered deep_ep.{op}: every rank "
            f"of group {ctx.group_name!r} must issue the group's ops in the same order",
            op=op, rank=ctx.rank, peers=peers, group_name=ctx.group_name)
    for p, h in sorted(headers.items()):
        theirs = _config_of(h)
        if theirs != ctx.config and 0 not in theirs + ctx.config:
            diff = ", ".join(f"{f}={a} on rank {p} but {b} here"
                             for f, a, b in zip(CONFIG_FIELDS, theirs, ctx.config) if a != b)
            raise ValueError(f"deep_ep.{op}: the Buffers of group {ctx.group_name!r} differ: "
                             f"{diff} (rank {ctx.rank}); create the Buffer with the same "
                             "arguments on every rank")
    return {p: _unpack(headers[p], payloads[p]) for p in recv_from}


# -- what the ops use ------------------------------------------------------------------------

def all_gather_parts(buf, op: str, parts: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every rank's ``parts`` (``[rank][part]``; this rank's are the given tensors). Parts may
    differ in shape between ranks; callers check what must agree (``require_same``)."""
    return gather_parts(buf, op, parts, range(_context(buf).world_size))


def gather_parts(buf, op: str, parts: Sequence[torch.Tensor],
                 ranks: Sequence[int]) -> list[list[torch.Tensor]]:
    """The ``parts`` of every group rank in ``ranks`` (this rank among them), ``[i][part]`` in
    the order of ``ranks``: an all-gather inside a subset of the group (the ranks of one host),
    over the group's own connections."""
    ctx = _context(buf)
    ranks = list(ranks)
    peers = [p for p in ranks if p != ctx.rank]
    got = _exchange(ctx, op, parts, peers, peers) if peers else {}
    got[ctx.rank] = list(parts)
    return [got[r] for r in ranks]


def send_recv_parts(buf, op: str, parts: Sequence[torch.Tensor], dst: int,
                    src: int) -> Optional[list[torch.Tensor]]:
    """Send ``parts`` to group rank ``dst`` and return the parts group rank ``src`` sent
    (-1: no send / no receive, then None is returned)."""
    ctx = _context(buf)
    got = _exchange(ctx, op, parts, [dst] if dst >= 0 else [], [src] if src >= 0 else [])
    return got.get(src)


def stack_rows(per_rank: Sequence[torch.Tensor], rows: int, fill: float = 0) -> torch.Tensor:
    """``[R, rows, *rest]``: each rank's tensor padded along dim 0 to ``rows`` with ``fill``."""
    first = per_rank[0]
    out = torch.zeros((len(per_rank), rows, *first.shape[1:]), dtype=first.dtype)
    if fill != 0:
        out.fill_(fill)
    for r, t in enumerate(per_rank):
        out[r, :t.shape[0]] = t
    return out


def require_same(op: str, buf, name: str, per_rank: Sequence[torch.Tensor],
                 rows_may_differ: bool = False) -> None:
    """Raise ValueError unless ``name`` has one dtype and shape on every rank (beyond dim 0
    only, with ``rows_may_differ``)."""
    def key(t: torch.Tensor):
        return (t.dtype, tuple(t.shape[1:]) if rows_may_differ else tuple(t.shape))
    if all(key(t) == key(per_rank[0]) for t in per_rank):
        return
    what = "dtype and row shape" if rows_may_differ else "shape and dtype"
    if all(t.dtype == per_rank[0].dtype for t in per_rank):
        got = f"shapes {[tuple(t.shape) for t in per_rank]}"
    else:
        got = f"{[(tuple(t.shape), str(t.dtype)) for t in per_rank]} by rank"
    raise ValueError(f"deep_ep.{op}: {name} must have the same {what} on every rank of "
                     f"{buf.group_name!r}; got {got}")
