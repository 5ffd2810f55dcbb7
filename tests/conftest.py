"""Shared fixtures: a one-rank gloo group in the test process itself."""
from __future__ import annotations

import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def single_rank_group():
    """The default process group: gloo, world size 1 (for checks that need no peers)."""
    if not dist.is_initialized():
        from deep_ep_ops.localhost import free_port
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    yield dist.group.WORLD
