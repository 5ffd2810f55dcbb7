"""The host-side handle records of the C++ CUDA kernels (csrc/torch/handle_records.cpp) and
their header checks (csrc/torch/handle_checks.cpp), built here without CUDA
(tests/csrc/handle_records_cpu_module.cpp) and checked on CPU tensors: what a lookup finds
(the recorded view only, alive, not written since), the trimmed handle of exact=True, pruning,
threads, the cost of a lookup, and that the C++ messages are validation.py's to the character.

On the GPU, tests/gpu/test_errors_gpu.py checks the same through the ops. Needs a C++ compiler
and ninja; the first run builds the module (well under a minute on 2 cores).
"""
from __future__ import annotations

import gc
import shutil
import threading
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from deep_ep_ops import handle as H
from deep_ep_ops import validation as V
from tests.cpu_extension import build_cpu_extension

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(),
    reason="needs a C++ compiler and ninja to build csrc/torch/handle_records.cpp")


K = 2
W = H.handle_width(K)
BUF = SimpleNamespace(id=5, group_name="0", world_size=1, num_topk=K)  # what validation reads


@pytest.fixture(scope="module")
def m() -> ModuleType:
    return build_cpu_extension("deep_ep_ops_handle_records_cpu",
                               ["torch/handle_records.cpp", "torch/handle_checks.cpp"],
                               "handle_records_cpu_module.cpp", opt="-O2")


def _handle(T=3, C=12, buffer_id=5, R=1, k=K) -> torch.Tensor:
    h = torch.zeros(1 + T + C, W, dtype=torch.int32)
    h[0, H.HDR_BUFFER_ID], h[0, H.HDR_NUM_RANKS], h[0, H.HDR_TOPK] = buffer_id, R, k
    h[0, H.HDR_NUM_TOKENS], h[0, H.HDR_NUM_ROWS] = T, C
    return h


def _record(m, h: torch.Tensor) -> None:
    hdr = h[0].tolist()
    m.record_handle(h, hdr[H.HDR_BUFFER_ID], hdr[H.HDR_NUM_RANKS], hdr[H.HDR_TOPK],
                    hdr[H.HDR_NUM_TOKENS], hdr[H.HDR_NUM_ROWS])


def _facts(T=3, C=12, buffer_id=5, R=1, k=K) -> dict:
    return dict(buffer_id=buffer_id, num_ranks=R, topk=k, num_tokens=T, num_rows=C)


def test_lookup_finds_the_recorded_view_only(m):
    h = _handle()
    _record(m, h)
    assert m.handle_record(h) == _facts()
    # the same bytes under another tensor object: found
    assert m.handle_record(h.detach()) == _facts()
    assert m.handle_record(h[:]) == _facts()
    assert m.handle_record(h.view(h.shape)) == _facts()
    # other bytes or another view: not found (the callers fall back to reading the header)
    assert m.handle_record(h.clone()) is None
    assert m.handle_record(h[:-1]) is None
    assert m.handle_record(h[1:]) is None
    assert m.handle_record(h.view(-1, W * (1 + 3 + 12) // 4)) is None
    assert m.handle_record(h.t()) is None  # not contiguous
    assert m.handle_record(h[0]) is None  # not 2-D


def test_written_in_place_is_no_longer_recorded(m):
    h = _handle()
    _record(m, h)
    h[0, H.HDR_BUFFER_ID] = 7  # bumps the version counter shared by every view of h
    assert m.handle_record(h) is None
    _record(m, h)
    assert m.handle_record(h) == _facts(buffer_id=7)


def test_inference_tensors(m):
    with torch.inference_mode():
        h = _handle()
        _record(m, h)
        assert m.handle_record(h) == _facts()
    assert m.handle_record(h) == _facts()


def test_a_freed_handle_never_matches(m):
    for _ in range(50):  # freed storages; their memory (and maybe address) reused at once
        h = _handle()
        _record(m, h)
        del h
        fresh = _handle()
        assert m.handle_record(fresh) is None
        del fresh


def test_table_is_pruned(m):
    gc.collect()
    live = [_handle() for _ in range(100)]
    for h in live:
        _record(m, h)
    for _ in range(1000):
        _record(m, _handle())  # dies at once
    count = m.handle_record_count()
    # at most about twice the live records plus the unpruned minimum (64)
    assert count <= 2 * (len(live) + 64) + 1, count
    assert all(m.handle_record(h) == _facts() for h in live)


def test_trimmed_handle_inherits_the_record(m):
    static = _handle(T=3, C=12)
    _record(m, static)
    trimmed = torch.cat([static[:1 + 3], static[1 + 3:1 + 3 + 5]])
    trimmed[0, H.HDR_NUM_ROWS] = 5
    assert m.record_trimmed_handle(static, trimmed)
    assert m.handle_record(trimmed) == _facts(C=5)
    assert m.handle_record(static) == _facts(C=12)
    # a static handle without a record, or a "trim" that cannot be one: nothing recorded
    other = _handle()
    assert not m.record_trimmed_handle(other, trimmed.clone())
    assert not m.record_trimmed_handle(static, torch.zeros(2, W, dtype=torch.int32))
    assert not m.record_trimmed_handle(static, torch.zeros(30, W, dtype=torch.int32))


def _py_message(op: str, h: torch.Tensor, x_rows: int) -> str:
    with pytest.raises(ValueError) as info:
        V.check_handle_header(op, BUF, h, x_rows)
    return str(info.value)


def _cpp_message(m, op: str, h: torch.Tensor, x_rows: int, read_header: bool) -> str:
    with pytest.raises(ValueError) as info:
        m.check(op, h, BUF.id, BUF.world_size, BUF.num_topk, BUF.group_name, x_rows, read_header)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", ["other_buffer", "other_k", "combine_rows", "cached_rows"])
@pytest.mark.parametrize("source", ["record", "header"])
def test_messages_are_validation_py(m, case, source):
    op = "cached_dispatch" if case == "cached_rows" else "combine"
    h = _handle(buffer_id=3 if case == "other_buffer" else 5, k=3 if case == "other_k" else K)
    x_rows = {"cached_rows": 2, "combine_rows": 11}.get(case, 12 if op == "combine" else 3)
    if source == "record":
        _record(m, h)
    else:
        h = h.clone()  # no record: read from the header row
    want = _py_message(op, h, x_rows)
    assert _cpp_message(m, op, h, x_rows, read_header=source == "header") == want
    # the messages of docs/api.md
    assert want.startswith({
        "other_buffer": "deep_ep.combine: handle belongs to another Buffer: it was made by a "
                        "dispatch on Buffer #3, and group '0' has Buffer #5",
        "other_k": "deep_ep.combine: handle does not match the Buffer",
        "combine_rows": "deep_ep.combine: x has 11 rows, the handle's dispatch produced 12",
        "cached_rows": "deep_ep.cached_dispatch: x has 2 rows, the handle's dispatch had 3 "
                       "tokens"}[case]), want


def test_right_input_passes(m):
    h = _handle()
    _record(m, h)
    assert m.check("combine", h, 5, 1, K, "0", 12, False) == "record"
    assert m.check("cached_dispatch", h, 5, 1, K, "0", 3, False) == "record"
    c = h.clone()
    assert m.check("combine", c, 5, 1, K, "0", 12, True) == "header"
    assert m.check("combine", c, 5, 1, K, "0", 99, False) == "none"  # no record, no VALIDATE


def test_header_read_is_defensive(m):
    assert m.read_handle_header("combine", _handle()) == [5, 1, K, 3, 12]
    for bad in (torch.zeros(0, W, dtype=torch.int32), torch.zeros(4, 5, dtype=torch.int32),
                torch.zeros(4, W, dtype=torch.int64), torch.zeros(W, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"deep_ep.combine: handle must be an int32 "
                                             r"\[1 \+ T \+ V \+ C, W\] handle with a header row"):
            m.read_handle_header("combine", bad)


def test_threads(m):
    assert m.stress(4, 2000) == 4 * 2000
    # Python threads too (the binding holds the GIL; the C++ kernels take only the mutex)
    errors = []

    def work():
        try:
            for _ in range(200):
                h = _handle()
                _record(m, h)
                assert m.handle_record(h) == _facts()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_lookup_cost(m):
    """The lookup runs on every eager combine / cached_dispatch: a mutex, a hash lookup and a
    few compares. Typically ~30-60 ns here; the bound only catches a pathological regression."""
    h = _handle()
    _record(m, h)
    for _ in range(300):  # a realistic table: live handles of other layers beside it
        _record(m, _handle())
    ns = min(m.lookup_ns(h, 200_000) for _ in range(3))
    rec = min(m.record_ns(1000) for _ in range(3))  # 1000 live handles: prunes find none dead
    print(f"handle record lookup: {ns:.1f} ns, record: {rec:.1f} ns")
    assert ns < 2000, ns
    assert rec < 20000, rec
