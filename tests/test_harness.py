"""The multi-rank harness fails fast: a rank that raises ends the run at once (its peers,
stuck in a collective, are killed) and its traceback reaches the test."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_ranks


def _one_rank_fails(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.all_reduce(torch.ones(1))  # waits for rank 1 forever


def test_failing_rank_ends_the_run_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)--- rank 1 ---.*rank 1 gives up"):
        run_ranks(_one_rank_fails, 2, timeout_s=120)
    assert time.monotonic() - start < 60
