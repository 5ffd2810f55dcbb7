"""The direct-output slot table of the CUDA dispatch (csrc/ep/output_slots.hpp), built here
without CUDA (tests/csrc/output_slots_cpu_module.cpp): a slot is handed out only when free,
tensors over it keep it until the last one is gone, and racing threads never share one. On the
GPU, tests/gpu/test_direct_outputs_gpu.py checks the same through dispatch. Needs a C++
compiler and ninja (the first run builds the module)."""
from __future__ import annotations

import gc
import shutil
from types import ModuleType

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from tests.cpu_extension import build_cpu_extension

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(),
    reason="needs a C++ compiler and ninja to build csrc/ep/output_slots.hpp")


@pytest.fixture(scope="module")
def m() -> ModuleType:
    return build_cpu_extension("deep_ep_ops_output_slots_cpu", [], "output_slots_cpu_module.cpp")


def test_acquire_release(m: ModuleType) -> None:
    pool = m.OutputSlots(2)
    assert (pool.size(), pool.busy()) == (2, 0)
    a, b = pool.acquire(2), pool.acquire(2)
    assert {a, b} == {0, 1} and pool.acquire(2) == -1 and pool.busy() == 2
    pool.release(a)
    assert pool.busy() == 2 and pool.acquire(1) == -1  # one of a's two uses is still out
    pool.release(a)
    assert pool.busy() == 1 and pool.acquire(2) == a
    assert m.OutputSlots(0).acquire(2) == -1


def test_tensors_hold_their_slot(m: ModuleType) -> None:
    pool = m.OutputSlots(1)
    slot = pool.acquire(2)
    storage = torch.zeros(8)
    x, s = m.pair_in_slot(pool, slot, storage)
    view = x[1:]  # a view keeps the storage, and so the slot
    del x
    gc.collect()
    assert pool.busy() == 1
    del s
    gc.collect()
    assert pool.busy() == 1 and pool.acquire(2) == -1
    del view
    gc.collect()
    assert pool.busy() == 0 and pool.acquire(2) == slot


def test_threads_never_share_a_slot(m: ModuleType) -> None:
    assert m.race(2, 8, 20000) == 0
