"""Shared fixtures: a one-rank gloo group in the test process itself; the GPU tests' option
``--ranks-per-gpu N`` (several ranks share each GPU under MPS)."""
from __future__ import annotations

import os
import sys

import pytest
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--ranks-per-gpu", type=int, default=None,
                     help="GPU tests: put this many ranks on each GPU (MPS); default: one per "
                          "GPU while there are enough GPUs, else as few per GPU as fit")


def pytest_configure(config):
    per_gpu = config.getoption("--ranks-per-gpu")
    if per_gpu is not None:
        if per_gpu < 1:
            raise pytest.UsageError("--ranks-per-gpu must be >= 1")
        os.environ["DEEP_EP_OPS_TEST_RANKS_PER_GPU"] = str(per_gpu)


@pytest.fixture(scope="session")
def single_rank_group():
    """The default process group: gloo, world size 1 (for checks that need no peers)."""
    if not dist.is_initialized():
        from deep_ep_ops.local_ranks import init_single_rank_group
        init_single_rank_group("gloo")
    yield dist.group.WORLD
