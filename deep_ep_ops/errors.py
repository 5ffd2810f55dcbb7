"""Errors about peers: a rank of the group that did not take part in an op as this rank did.

Argument errors stay ``ValueError`` (raised before any data moves); these are raised while
waiting for other ranks.
"""
from __future__ import annotations


class PeerError(RuntimeError):
    """Peer rank(s) failed an op: the connection to them broke, or they called another op.

    Attributes: ``op`` (e.g. ``"dispatch"``), ``rank`` (this rank in the group), ``peers``
    (the group ranks at fault), ``group_name``.
    """

    def __init__(self, message: str, *, op: str, rank: int, peers: list[int],
                 group_name: str) -> None:
        super().__init__(message)
        self.op, self.rank, self.peers, self.group_name = op, rank, list(peers), group_name


class PeerTimeoutError(PeerError, TimeoutError):
    """Peer rank(s) did not enter the same op within ``Buffer(timeout_s=)``."""


class PeerMismatchError(PeerError):
    """Peer rank(s) entered a different op (every rank must issue the group's ops in the same
    order)."""
