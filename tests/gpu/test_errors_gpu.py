"""Bad inputs of the CUDA kernels (registered in C++, csrc/torch/ep_kernels.cpp) raise the
ValueError of tests/test_errors.py: its shape/dtype table (SHAPE_CASES) runs here on CUDA
tensors, every rule of deep_ep_ops/check_rules.py gives its example's exact message
(tests/ep_check_examples.py), plus the CUDA-only paths (device, contiguity, the Python
fallbacks) and the handle's header checks: always for a handle the C++ dispatch made (its
host-side record, csrc/torch/handle_records.hpp), with DEEP_EP_OPS_VALIDATE=1 for any other.

One rank, an NCCL group in this process (module fixture). Skips without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.ep_check_examples import EXAMPLES, READS_DATA, expected
from tests.test_errors import HID, SHAPE_CASES, E, K, M
from tests.test_errors import _inputs as _inputs_on

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.deep_ep


@pytest.fixture(scope="module")
def buf():
    import torch.distributed as dist

    import deep_ep_ops
    from deep_ep_ops.local_ranks import init_single_rank_group
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    if not dist.is_initialized():
        init_single_rank_group("nccl", device_id=dev)
        group = dist.group.WORLD
    else:  # e.g. the gloo group of tests/conftest.py: a 1-rank NCCL group beside it
        group = dist.new_group([0], backend="nccl")
    b = deep_ep_ops.Buffer(group, num_max_tokens_per_rank=M, hidden=HID, num_topk=K,
                           num_experts=E)
    yield b
    b.destroy()


def _inputs(T=3):
    return _inputs_on(T, "cuda")


def test_cpp_kernels_registered(buf):
    for name in ("_dispatch_static", "cached_dispatch", "combine"):
        dump = torch._C._dispatch_dump(f"deep_ep::{name}")
        cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
        assert cuda and "ep_kernels.cpp" in cuda[0], dump
    dump = torch._C._dispatch_dump("deep_ep::dispatch")
    assert "ep_kernels.cpp" in dump, dump


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_shape_checks(buf, case):
    call, pattern = SHAPE_CASES[case](buf, "cuda")
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("rule_id", sorted(EXAMPLES))
def test_rule_examples(buf, rule_id, monkeypatch):
    """Each rule, rendered into the C++ kernels (generated/ep_checks.hpp), raises the message
    Python raises for the same call, to the last character (the value rules with
    DEEP_EP_OPS_VALIDATE=1, which lets them read the data)."""
    if rule_id in READS_DATA:
        monkeypatch.setenv("DEEP_EP_OPS_VALIDATE", "1")
    op, args, _ = EXAMPLES[rule_id]
    with pytest.raises(ValueError) as err:
        getattr(ops, op)(**args("cuda"), group_name=buf.group_name)
    assert str(err.value) == expected(rule_id, buf.group_name, "cuda:0")


def test_full_message(buf):
    """The C++ message is the Python one to the last character (shape, dtype, device)."""
    x, idx, w = _inputs()
    with pytest.raises(ValueError, match=r"dispatch: x must be 2-D \[T, H\]; got shape "
                                         r"\(1, 3, 8\) torch.float32 on cuda:0"):
        ops.dispatch(x[None], None, idx, w, buf.group_name, E)


def test_roundtrip(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    y = ops.combine(out[0], out[5], None, buf.group_name)
    torch.testing.assert_close(y, x)
    exact = ops.dispatch(x, None, idx, w, buf.group_name, E, exact=True)
    assert exact[0].shape[0] == 3


def test_negative_num_sms(buf):
    x, idx, w = _inputs()
    with pytest.raises(ValueError, match=r"dispatch: num_sms must be >= 0"):
        ops.dispatch(x, None, idx, w, buf.group_name, E, 1, False, False, -1)


def test_unknown_group_name(buf):
    x, idx, w = _inputs()
    with pytest.raises(ValueError, match=r"group_name='nope': no deep_ep_ops.Buffer"):
        ops.dispatch(x, None, idx, w, "nope", E)
    with pytest.raises(ValueError, match=r"group_name='nope': no deep_ep_ops.Buffer"):
        ops.combine(x, torch.zeros(9, 9, dtype=torch.int32, device="cuda"), None, "nope")


def test_wrong_device(buf):
    x, idx, w = _inputs()
    with pytest.raises(ValueError, match=r"dispatch: topk_idx must be on cuda \(group .* is "
                                         r"nccl\); got shape \(3, 2\) torch.int64 on cpu"):
        ops.dispatch(x, None, idx.cpu(), w, buf.group_name, E)


def test_not_contiguous(buf):
    _, idx, w = _inputs()
    xt = torch.randn(HID, 3, device="cuda").t()
    with pytest.raises(ValueError, match=r"dispatch: x must be contiguous; got strides \(1, 3\)"):
        ops.dispatch(xt, None, idx, w, buf.group_name, E)


@pytest.mark.parametrize("bad, pattern", [
    ("out_of_range", r"expert ids in \[-1, 4\).*topk_idx\[1, 0\] = 4"),
    ("below", r"topk_idx\[0, 1\] = -2"),
    ("duplicate", r"free of duplicate expert ids within a row.*row 2"),
])
def test_expert_ids_validate(buf, monkeypatch, bad, pattern):
    monkeypatch.setenv("DEEP_EP_OPS_VALIDATE", "1")
    x, idx, w = _inputs()
    if bad == "out_of_range":
        idx[1, 0] = E
    elif bad == "below":
        idx[0, 1] = -2
    else:
        idx[2] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match=pattern):
        ops.dispatch(x, None, idx, w, buf.group_name, E)


def test_combine_int_x(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    with pytest.raises(ValueError, match=r"combine: x must be a 2-D \[C, H\] float tensor"):
        ops.combine(out[0].int(), out[5], None, buf.group_name)


def test_cached_dispatch_bad_handle(buf):
    with pytest.raises(ValueError, match=r"cached_dispatch: handle must be the int32"):
        ops.cached_dispatch(torch.randn(3, HID, device="cuda"), None,
                            torch.zeros(9, 3, dtype=torch.int32, device="cuda"), buf.group_name)


def test_cached_dispatch_scales_without_fp8(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    with pytest.raises(ValueError, match=r"x_scales must be given exactly when x is "
                                         r"float8_e4m3fn"):
        ops.cached_dispatch(x, torch.ones(3, 1, device="cuda"), out[5], buf.group_name)


def test_cached_dispatch_too_wide(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    with pytest.raises(ValueError, match=r"cached_dispatch: x must be \[T, <= 8\]"):
        ops.cached_dispatch(torch.randn(3, HID + 1, device="cuda"), None, out[5],
                            buf.group_name)


def test_handle_header_checks_with_validate(buf, monkeypatch):
    """DEEP_EP_OPS_VALIDATE=1: for a handle without a record (a clone) the C++ kernels read the
    handle's header (Buffer id, rows) and raise validation.py's messages."""
    monkeypatch.setenv("DEEP_EP_OPS_VALIDATE", "1")
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    C = out[0].shape[0]
    for handle in (out[5], out[5].clone()):  # from the record, then from the header row
        with pytest.raises(ValueError, match=rf"combine: x has {C - 1} rows, the handle's "
                                             rf"dispatch produced {C}$"):
            ops.combine(out[0][:-1], handle, None, buf.group_name)
        with pytest.raises(ValueError, match=r"cached_dispatch: x has 2 rows, the handle's "
                                             r"dispatch had 3 tokens"):
            ops.cached_dispatch(x[:2], None, handle, buf.group_name)
    forged = out[5].clone()
    forged[0, 9] = buf.id + 1000  # HDR_BUFFER_ID
    with pytest.raises(ValueError, match=rf"combine: handle belongs to another Buffer: it was "
                                         rf"made by a dispatch on Buffer #{buf.id + 1000}"):
        ops.combine(out[0], forged, None, buf.group_name)


def _record(handle):
    from deep_ep_ops.cuda import extension
    return extension.module().handle_record(handle)


def _no_validate(monkeypatch):
    monkeypatch.delenv("DEEP_EP_OPS_VALIDATE", raising=False)


def test_dispatch_records_its_handle(buf, monkeypatch):
    """The C++ dispatch (static, and exact through the trim) records what it stamped into the
    header; a clone or a slice of the handle has no record."""
    _no_validate(monkeypatch)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    C = out[0].shape[0]
    facts = dict(buffer_id=buf.id, num_ranks=1, topk=K, num_tokens=3)
    assert _record(out[5]) == dict(facts, num_rows=C)
    assert _record(out[5].clone()) is None
    assert _record(out[5][:-1]) is None
    exact = ops.dispatch(x, None, idx, w, buf.group_name, E, exact=True)
    assert _record(exact[5]) == dict(facts, num_rows=exact[0].shape[0])
    # the header the kernels wrote says the same
    hdr = out[5][0].tolist()
    assert (hdr[9], hdr[3], hdr[8], hdr[2], hdr[10]) == (buf.id, 1, K, 3, C)


def test_handle_header_checks_without_validate(buf, monkeypatch):
    """No DEEP_EP_OPS_VALIDATE: a handle the C++ dispatch made is still checked (from its
    record, on the host): rows of combine's and cached_dispatch's x, static and exact."""
    _no_validate(monkeypatch)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    C = out[0].shape[0]
    assert _record(out[5]) is not None  # else the wrong rows below would reach the kernels
    with pytest.raises(ValueError, match=rf"combine: x has {C - 1} rows, the handle's dispatch "
                                         rf"produced {C}$"):
        ops.combine(out[0][:-1], out[5], None, buf.group_name)
    with pytest.raises(ValueError, match=r"cached_dispatch: x has 2 rows, the handle's dispatch "
                                         r"had 3 tokens"):
        ops.cached_dispatch(x[:2], None, out[5], buf.group_name)
    exact = ops.dispatch(x, None, idx, w, buf.group_name, E, exact=True)
    n = exact[0].shape[0]
    assert _record(exact[5]) is not None
    with pytest.raises(ValueError, match=rf"combine: x has {n - 1} rows, the handle's dispatch "
                                         rf"produced {n}$"):
        ops.combine(exact[0][:-1], exact[5], None, buf.group_name)
    # the right rows pass
    torch.testing.assert_close(ops.combine(out[0], out[5], None, buf.group_name), x)
    torch.testing.assert_close(ops.combine(exact[0], exact[5], None, buf.group_name), x)


def test_handle_of_another_buffer_without_validate(buf, monkeypatch):
    """No DEEP_EP_OPS_VALIDATE: a handle made on another Buffer (another group over the same
    rank; then that Buffer destroyed) is refused by combine and cached_dispatch."""
    import torch.distributed as dist

    import deep_ep_ops
    _no_validate(monkeypatch)
    other = deep_ep_ops.Buffer(dist.new_group([0], backend="nccl"), num_max_tokens_per_rank=M,
                               hidden=HID, num_topk=K, num_experts=E)
    x, idx, w = _inputs()
    try:
        out = ops.dispatch(x, None, idx, w, other.group_name, E)
        assert _record(out[5])["buffer_id"] == other.id != buf.id
        pattern = (rf"handle belongs to another Buffer: it was made by a dispatch on Buffer "
                   rf"#{other.id}, and group '{buf.group_name}' has Buffer #{buf.id}")
        with pytest.raises(ValueError, match=rf"combine: {pattern}"):
            ops.combine(out[0], out[5], None, buf.group_name)
        with pytest.raises(ValueError, match=rf"cached_dispatch: {pattern}"):
            ops.cached_dispatch(x, None, out[5], buf.group_name)
    finally:
        other.destroy()
    with pytest.raises(ValueError, match=r"combine: handle belongs to another Buffer"):
        ops.combine(out[0], out[5], None, buf.group_name)


def test_cloned_handle_works_without_validate(buf, monkeypatch):
    """A copy of a handle has no record: it is not checked without DEEP_EP_OPS_VALIDATE, and
    the ops give the same results as with the original."""
    _no_validate(monkeypatch)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    copy = out[5].clone()
    assert _record(copy) is None
    torch.testing.assert_close(ops.combine(out[0], copy, None, buf.group_name),
                               ops.combine(out[0], out[5], None, buf.group_name))
    torch.testing.assert_close(ops.cached_dispatch(x, None, copy, buf.group_name)[0],
                               ops.cached_dispatch(x, None, out[5], buf.group_name)[0])
    # written in place: the record no longer describes it (the header is what the kernels read)
    out[5][0, 9] = buf.id
    assert _record(out[5]) is None


def test_handle_header_checks_do_not_sync(buf, monkeypatch):
    """The record check reads nothing from the GPU: with torch's sync debug mode at "error" a
    right call runs and a wrong one raises the header ValueError (not a sync error)."""
    _no_validate(monkeypatch)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    C = out[0].shape[0]
    assert _record(out[5]) is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ops.combine(out[0], out[5], None, buf.group_name)
        with pytest.raises(ValueError, match=rf"combine: x has {C - 1} rows"):
            ops.combine(out[0][:-1], out[5], None, buf.group_name)
        with pytest.raises(ValueError, match=r"cached_dispatch: x has 2 rows"):
            ops.cached_dispatch(x[:2], None, out[5], buf.group_name)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y, x)


def test_handle_record_made_during_graph_capture(buf, monkeypatch):
    """A dispatch captured in a CUDA graph records its static handle once (capture runs the
    host code); replays rewrite the same header, and eager calls with that handle are checked."""
    from tests.gpu.dist_gpu import capture_graph
    _no_validate(monkeypatch)
    x, idx, w = _inputs()
    static_x = x.clone()

    def step():
        out = ops.dispatch(static_x, None, idx, w, buf.group_name, E)
        return out, ops.combine(out[0], out[5], None, buf.group_name)
    graph, (out, y) = capture_graph(step)
    C = out[0].shape[0]
    assert _record(out[5]) == dict(buffer_id=buf.id, num_ranks=1, topk=K, num_tokens=3,
                                   num_rows=C)
    for scale in (1.0, 2.0):
        static_x.copy_(scale * x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, scale * x)
    assert _record(out[5]) is not None
    with pytest.raises(ValueError, match=rf"combine: x has {C - 1} rows"):
        ops.combine(out[0][:-1], out[5], None, buf.group_name)
    del graph
