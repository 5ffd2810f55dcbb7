"""Run a test body on R local CPU ranks (gloo), one process each; failures of any rank surface
in the test with every rank's traceback (deep_ep_ops.local_ranks does the process handling)."""
from __future__ import annotations

from typing import Any, Callable

from deep_ep_ops.local_ranks import spawn


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              timeout_s: float = 600) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on every rank of a gloo group (CPU); returns each
    rank's result."""
    return spawn(fn, world_size, *args, backend="gloo", timeout_s=timeout_s,
                 what="distributed test")
