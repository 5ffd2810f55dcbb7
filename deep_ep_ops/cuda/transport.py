"""Which peer memory a Buffer's CUDA state lives in (collective; see csrc/transport/).

* ``"nccl"``: an NCCL symmetric window on the group's own communicator. Needs an NCCL group,
  NCCL >= 2.28 with the device API (the extension built against the headers of the loaded
  libnccl) and every rank in one NCCL LSA team: one host, one GPU per rank, P2P between them.
* ``"ipc"``: CUDA IPC. Each rank ``cudaMalloc``s its window, the IPC handles go round the
  Buffer's group (gloo or NCCL), every rank opens its peers'. Needs every rank on one host; works
  with any NCCL and with several ranks per GPU (MPS).
* ``"auto"``: ``"nccl"`` when its LSA team covers the group, else ``"ipc"`` when every rank is
  on this host, else a ValueError saying that the group spans hosts.

A rank's host is its machine (hostname and boot id); NCCL's idea of it honours ``NCCL_HOSTID``,
which is how ranks that share a GPU (or simulate hosts) tell NCCL they are apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from deep_ep_ops.hosts import describe, machine_id

TRANSPORTS = ("auto", "nccl", "ipc")


def nccl_host_id() -> str:
    """The host NCCL puts this rank on: ``NCCL_HOSTID`` when set, else the machine."""
    return os.environ.get("NCCL_HOSTID") or machine_id()


@dataclass(frozen=True)
class RankPlace:
    requested: str
    machine: str
    nccl_host: str


def spans_hosts_error(ids: list[str], what: str) -> ValueError:
    return ValueError(
        f"Buffer(transport={what!r}): the group spans {len(set(ids))} hosts ({describe(ids)}); "
        "the CUDA backend needs every rank of the group on one host (load/store peers)")


def choose(group: dist.ProcessGroup, requested: str, nccl_lsa_size: Callable[[], int]) -> str:
    """The transport every rank of ``group`` uses (collective: all ranks agree).

    ``nccl_lsa_size`` returns the ranks of this rank's NCCL LSA team (0 when the build or the
    group cannot make an NCCL window); it is called only when NCCL is a candidate.
    """
    if requested not in TRANSPORTS:
        raise ValueError(f"Buffer: transport must be one of {TRANSPORTS}, got {requested!r}")
    world = dist.get_world_size(group)
    places: list = [None] * world
    dist.all_gather_object(places, RankPlace(requested, machine_id(), nccl_host_id()),
                           group=group)
    asked = sorted({p.requested for p in places})
    if len(asked) > 1:
        raise ValueError(f"Buffer: every rank must ask for the same transport, got {asked} "
                         f"({[p.requested for p in places]} by rank)")
    machines = [p.machine for p in places]
    nccl_hosts = [p.nccl_host for p in places]
    one_machine = len(set(machines)) == 1
    nccl_candidate = requested in ("auto", "nccl") and len(set(nccl_hosts)) == 1 and \
        dist.get_backend(group) == "nccl"
    if requested == "nccl" and dist.get_backend(group) != "nccl":
        raise ValueError("Buffer(transport='nccl') needs a process group with the NCCL backend")
    if requested == "nccl" and len(set(nccl_hosts)) > 1:
        raise spans_hosts_error(nccl_hosts, requested)
    lsa_ok = False
    if nccl_candidate:
        sizes: list = [None] * world
        dist.all_gather_object(sizes, int(nccl_lsa_size()), group=group)
        lsa_ok = all(s == world for s in sizes)
        if requested == "nccl" and not lsa_ok:
            raise ValueError(
                f"Buffer(transport='nccl'): NCCL's load/store (LSA) teams hold {sizes} ranks by "
                f"rank, not the whole group of {world} (no P2P between the GPUs, or ranks sharing "
                "a GPU); use transport='ipc' for ranks of one host")
    if lsa_ok:
        return "nccl"
    if one_machine:
        return "ipc"
    raise spans_hosts_error(machines, requested)


def bytes_all_gather(group: dist.ProcessGroup) -> Callable[[bytes], list[bytes]]:
    """The all-gather the IPC transport exchanges its handles with (set-up only)."""
    world = dist.get_world_size(group)

    def gather(mine: bytes) -> list[bytes]:
        out: list = [None] * world
        dist.all_gather_object(out, bytes(mine), group=group)
        return out
    return gather


def comm_ptr(group: dist.ProcessGroup, device: torch.device) -> int:
    """The group's own ncclComm_t (created by one tiny collective when still lazy)."""
    backend = group._get_backend(torch.device("cuda"))
    ptr = backend._comm_ptr()
    if ptr == 0:
        # The communicator is created lazily by the first collective unless the group was made
        # with device_id=...; one tiny all_reduce creates it.
        t = torch.zeros(1, device=device)
        dist.all_reduce(t, group=group)
        torch.cuda.synchronize(device)
        ptr = backend._comm_ptr()
    if ptr == 0:
        raise RuntimeError(f"deep_ep_ops: group {group.group_name!r} has no NCCL communicator "
                           "(create it with device_id=... or run a collective first)")
    return ptr


def create(ext, buf, requested: str):
    """The C++ transport of ``buf`` (collective over ``buf.group``)."""
    device = buf.device.index if buf.device.index is not None else torch.cuda.current_device()
    if requested == "nccl":  # the same on every rank: raising here cannot strand a peer
        if not ext.nccl_window_supported():
            raise ValueError(f"Buffer(transport='nccl') needs NCCL >= 2.28 with the device API; "
                             f"this build has NCCL code {ext.nccl_version_code()}; use 'ipc'")
        if not _nccl_versions_match(ext):
            raise ValueError(f"Buffer(transport='nccl'): the extension was built against NCCL "
                             f"code {ext.nccl_version_code()} but torch loads NCCL "
                             f"{torch.cuda.nccl.version()}; the NCCL device API needs them equal "
                             "(rebuild, or use 'ipc')")

    def lsa_size() -> int:
        if not ext.nccl_window_supported() or not _nccl_versions_match(ext):
            return 0
        return ext.nccl_lsa_size(comm_ptr(buf.group, buf.device))
    name = choose(buf.group, requested, lsa_size)
    if name == "nccl":
        return ext.nccl_window_transport(comm_ptr(buf.group, buf.device), buf.rank,
                                         buf.world_size, device)
    return ext.cuda_ipc_transport(buf.rank, buf.world_size, device, bytes_all_gather(buf.group))


def _nccl_versions_match(ext) -> bool:
    major, minor, patch = torch.cuda.nccl.version()[:3]
    return major * 10000 + minor * 100 + patch == ext.nccl_version_code()
