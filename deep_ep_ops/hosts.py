"""Which ranks of a group share a host.

A host is a machine (hostname and kernel boot id). The ranks of a group must form hosts of equal
size in rank order: host h holds ranks ``[h*L, (h+1)*L)``. Combine adds a token's partial sums
inside each host first and then the host sums in ascending host order (docs/contract.md), so
the host layout is part of the result's rounding. ``Buffer(ranks_per_host=L)`` sets L
explicitly, which is how tests simulate several hosts on one machine.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from deep_ep_ops.meta.shapes import virtual_tokens


def machine_id() -> str:
    """This machine: hostname plus the kernel's boot id (a container shares both with its host
    only when it shares the host's kernel and UTS namespace, as NCCL assumes too)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class HostLayout:
    """``num_hosts`` hosts of ``ranks_per_host`` consecutive ranks each."""
    num_hosts: int
    ranks_per_host: int

    def host_of(self, rank: int) -> int:
        return rank // self.ranks_per_host


@dataclass(frozen=True)
class RankPlace:
    """Where one rank of a Buffer sits: N hosts of L ranks, host h, local index l, and its
    Buffer's M; ``V = N*M`` virtual-token slots (slot ``h''*M + j``: rail row j from host h'')."""
    N: int
    L: int
    h: int
    l: int
    M: int

    @property
    def V(self) -> int:
        return virtual_tokens(self.N, self.M)

    @property
    def host_ranks(self) -> list[int]:
        return [self.h * self.L + i for i in range(self.L)]


def place_of(buf) -> RankPlace:
    """The place of ``buf``'s rank (``buf``: a Buffer or a stand-in with ``hosts``, ``rank`` and
    ``num_max_tokens_per_rank``)."""
    L = buf.hosts.ranks_per_host
    h, l = divmod(buf.rank, L)
    return RankPlace(buf.hosts.num_hosts, L, h, l, buf.num_max_tokens_per_rank)


def ranks_by_host(ids: list[str]) -> dict[str, list[int]]:
    """The ranks of each host, hosts in order of their first rank."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(ids):
        by_host.setdefault(host, []).append(rank)
    return by_host


def describe(ids: list[str]) -> str:
    return "; ".join(f"ranks {ranks} on host {host!r}" for host, ranks in ranks_by_host(ids).items())


def layout_from_ids(ids: list[str]) -> HostLayout:
    """The layout of a group whose rank r runs on host ``ids[r]``; a ValueError naming the hosts
    and their ranks unless they are equal-sized blocks of consecutive ranks."""
    by_host = ranks_by_host(ids)
    sizes = {len(ranks) for ranks in by_host.values()}
    L = len(ids) // len(by_host)
    blocks = all(ranks == list(range(ranks[0], ranks[0] + L)) for ranks in by_host.values())
    if len(sizes) != 1 or not blocks:
        raise ValueError(
            f"Buffer: the group's hosts must hold the same number of consecutive ranks; got "
            f"{describe(ids)} (start one process per GPU in rank order on every host, or pass "
            "ranks_per_host)")
    return HostLayout(len(by_host), L)


def group_layout(group: dist.ProcessGroup, ranks_per_host: Optional[int]) -> HostLayout:
    """The host layout of ``group``: from ``ranks_per_host`` when given, else from the machine
    of every rank (collective: an all-gather over the group)."""
    world = dist.get_world_size(group)
    if ranks_per_host is not None:
        if not isinstance(ranks_per_host, int) or ranks_per_host < 1 or world % ranks_per_host:
            raise ValueError(f"Buffer: ranks_per_host must be an int >= 1 dividing the group "
                             f"size {world}, got {ranks_per_host!r}")
        return HostLayout(world // ranks_per_host, ranks_per_host)
    ids: list = [None] * world
    dist.all_gather_object(ids, machine_id(), group=group)
    return layout_from_ids(ids)
