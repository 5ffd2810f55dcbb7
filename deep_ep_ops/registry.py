"""The one registry of Buffers: ``group_name -> Buffer``.

Ops take their group as a plain string (what torch.compile, export and CUDA graphs handle) and
every implementation looks its Buffer up here. The CUDA extension's C++ kernels keep a copy of
this table (group name -> backend and EP state) so that their eager path never calls back into
Python; this module alone writes that copy, in the same step as its own table, so the two cannot
disagree.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Optional

# A deep_ep_ops.buffer.Buffer. Not imported: the Buffer module imports this one.
BufferT = Any

_BUFFERS: dict[str, BufferT] = {}
_LOCK = threading.Lock()
_IDS = itertools.count(1)
_kernel_table: Optional[Any] = None  # the loaded CUDA extension, once loaded


def next_buffer_id() -> int:
    """A number no other Buffer of this process has (handles carry it: a handle names the
    Buffer whose dispatch made it)."""
    with _LOCK:
        return next(_IDS)


def get(group_name: str) -> BufferT:
    """The Buffer registered for ``group_name``; a ValueError naming the registered ones if
    there is none."""
    buf = _BUFFERS.get(group_name)
    if buf is None:
        raise ValueError(missing_message(group_name, sorted(_BUFFERS)))
    return buf


def missing_message(group_name: str, known: list[str]) -> str:
    # The C++ kernels (csrc/torch/registry.cpp) raise the same text.
    return (f"group_name={group_name!r}: no deep_ep_ops.Buffer is registered for this group "
            f"(registered: {known or 'none'}); create one with deep_ep_ops.Buffer(group, ...) "
            "on every rank")


def add(buf: BufferT) -> None:
    """Claim ``buf.group_name`` for ``buf`` (one Buffer per group)."""
    with _LOCK:
        if buf.group_name in _BUFFERS:
            raise RuntimeError(
                f"Buffer: group {buf.group_name!r} already has a Buffer; destroy() it first "
                "(one Buffer per group; use a second group over the same ranks for concurrent "
                "in-flight work)")
        _BUFFERS[buf.group_name] = buf
        _publish(buf)


def update(buf: BufferT) -> None:
    """``buf`` has new CUDA state: let the C++ kernels see it."""
    with _LOCK:
        if _BUFFERS.get(buf.group_name) is buf:
            _publish(buf)


def remove(buf: BufferT) -> bool:
    """Forget ``buf``; False if its name belongs to another Buffer (or none)."""
    with _LOCK:
        if _BUFFERS.get(buf.group_name) is not buf:
            return False
        del _BUFFERS[buf.group_name]
        if _kernel_table is not None:
            _kernel_table.unregister_group(buf.group_name)
        return True


def attach_kernel_table(ext: Any) -> None:
    """The CUDA extension is loaded: copy every registered Buffer into its C++ table (called
    once, by deep_ep_ops.cuda.extension)."""
    global _kernel_table
    with _LOCK:
        _kernel_table = ext
        for buf in _BUFFERS.values():
            _publish(buf)


def _publish(buf: BufferT) -> None:
    if _kernel_table is not None:
        _kernel_table.register_group(buf.group_name, buf.backend, buf.ep_state_or_none(),
                                     getattr(buf, "multihost", None) is not None)
