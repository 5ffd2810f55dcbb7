"""Bad inputs raise clear errors naming the argument and the expectation (one test each)."""
from __future__ import annotations

import pytest
import torch

import deep_ep_ops

E, K, M, HID = 4, 2, 4, 8
ops = torch.ops.deep_ep


@pytest.fixture
def buf(single_rank_group):
    b = deep_ep_ops.Buffer(single_rank_group, num_max_tokens_per_rank=M, hidden=HID,
                           num_topk=K, num_experts=E)
    yield b
    b.destroy()


def _inputs(T=3, device="cpu"):
    x = torch.randn(T, HID, device=device)
    idx = torch.tensor([[0, 1], [2, 3], [1, -1]], device=device)[:T]
    w = torch.rand(T, K, device=device)
    return x, idx, w


# The shape / dtype checks of dispatch and combine, as (buf, device) -> (call, message pattern).
# Here they run on CPU tensors (deep_ep_ops/validation.py raises); tests/gpu/test_errors_gpu.py
# runs the same table on CUDA tensors, where the C++ kernels (csrc/torch/ep_kernels.cpp) raise.
def _dispatch_call(buf, x, idx, w, x_scales=None, num_experts=E, *rest):
    return lambda: ops.dispatch(x, x_scales, idx, w, buf.group_name, num_experts, *rest)


def _x_dtype(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x.to(torch.int32), idx, w), r"dispatch: x must be a float dtype"


def _x_not_2d(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x[None], idx, w), r"dispatch: x must be 2-D \[T, H\]"


def _hidden_mismatch(buf, dev):
    _, idx, w = _inputs(device=dev)
    return (_dispatch_call(buf, torch.randn(3, HID + 1, device=dev), idx, w),
            r"x must be \[T, 8\] \(hidden of the Buffer")


def _too_many_tokens(buf, dev):
    x = torch.randn(M + 1, HID, device=dev)
    idx = torch.zeros(M + 1, K, dtype=torch.int64, device=dev)
    idx[:, 1] = 1
    return (_dispatch_call(buf, x, idx, torch.rand(M + 1, K, device=dev)),
            r"at most num_max_tokens_per_rank=4 rows")


def _topk_idx_shape(buf, dev):
    x, idx, w = _inputs(device=dev)
    return (_dispatch_call(buf, x, idx[:, :1].contiguous(), w),
            r"topk_idx must be \[3, 2\] int64 or int32")


def _topk_idx_dtype(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x, idx.float(), w), r"topk_idx must be .* int64 or int32"


def _topk_weights_shape(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x, idx, w[:2]), r"topk_weights must be \[3, 2\]"


def _num_experts_mismatch(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x, idx, w, None, 8), r"num_experts must be 4"


def _fp8_without_scales(buf, dev):
    x, idx, w = _inputs(device=dev)
    return (_dispatch_call(buf, x.to(torch.float8_e4m3fn), idx, w),
            r"x_scales must be a \[T, P\]")


def _scales_wrong_dtype(buf, dev):
    x, idx, w = _inputs(device=dev)
    scales = torch.ones(3, 1, dtype=torch.float16, device=dev)
    return (_dispatch_call(buf, x.to(torch.float8_e4m3fn), idx, w, scales),
            r"x_scales must be \[3, P\] float32 or int32")


def _bad_alignment(buf, dev):
    x, idx, w = _inputs(device=dev)
    return _dispatch_call(buf, x, idx, w, None, E, 0), r"expert_alignment must be an int >= 1"


def _combine_bad_handle(buf, dev):
    def call():
        ops.combine(torch.randn(4, HID, device=dev),
                    torch.zeros(9, 3, dtype=torch.int32, device=dev), None, buf.group_name)
    return call, r"combine: handle must be the int32"


def _combine_weights_shape(buf, dev):
    x, idx, w = _inputs(device=dev)
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    return (lambda: ops.combine(out[0], out[5], torch.ones(3, device=dev), buf.group_name),
            r"weights must be None or \[4\] float32")


def _combine_too_wide(buf, dev):
    x, idx, w = _inputs(device=dev)
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    wide = torch.randn(out[0].shape[0], HID + 1, device=dev)
    return (lambda: ops.combine(wide, out[5], None, buf.group_name),
            r"combine: x must be \[C, <= 8\]")


SHAPE_CASES = {f.__name__[1:]: f for f in (
    _x_dtype, _x_not_2d, _hidden_mismatch, _too_many_tokens, _topk_idx_shape, _topk_idx_dtype,
    _topk_weights_shape, _num_experts_mismatch, _fp8_without_scales, _scales_wrong_dtype,
    _bad_alignment, _combine_bad_handle, _combine_weights_shape, _combine_too_wide)}


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_shape_checks(buf, case):
    call, pattern = SHAPE_CASES[case](buf, "cpu")
    with pytest.raises(ValueError, match=pattern):
        call()


def test_expert_id_out_of_range(buf):
    x, idx, w = _inputs()
    idx[1, 0] = E
    with pytest.raises(ValueError, match=r"expert ids in \[-1, 4\).*topk_idx\[1, 0\] = 4"):
        ops.dispatch(x, None, idx, w, buf.group_name, E)


def test_expert_id_below_minus_one(buf):
    x, idx, w = _inputs()
    idx[0, 1] = -2
    with pytest.raises(ValueError, match=r"topk_idx\[0, 1\] = -2"):
        ops.dispatch(x, None, idx, w, buf.group_name, E)


def test_duplicate_expert_in_row(buf):
    x, idx, w = _inputs()
    idx[2] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"free of duplicate expert ids within a row.*row 2"):
        ops.dispatch(x, None, idx, w, buf.group_name, E)


def test_unknown_group_name(buf):
    x, idx, w = _inputs()
    with pytest.raises(ValueError, match=r"group_name='nope': no deep_ep_ops.Buffer"):
        ops.dispatch(x, None, idx, w, "nope", E)


def test_combine_rows_mismatch(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    C = out[0].shape[0]
    with pytest.raises(ValueError, match=rf"combine: x has {C - 1} rows, the handle's dispatch "
                                         rf"produced {C}$"):
        ops.combine(out[0][:-1], out[5], None, buf.group_name)


def test_exact_handle_with_rows_of_another_dispatch(buf):
    """exact=True: each dispatch returns the rows it uses; rows of another dispatch are told
    apart from the handle's own by their count."""
    x, idx, w = _inputs()
    one = ops.dispatch(x, None, idx, w, buf.group_name, E, 1, False, True)  # 3 tokens
    two = ops.dispatch(x[:1], None, idx[:1], w[:1], buf.group_name, E, 1, False, True)
    with pytest.raises(ValueError, match=r"combine: x has 1 rows, the handle's dispatch "
                                         r"produced 3$"):
        ops.combine(two[0], one[5], None, buf.group_name)


def test_cached_dispatch_tokens_mismatch(buf):
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, buf.group_name, E)
    with pytest.raises(ValueError, match=r"cached_dispatch: x has 2 rows, the handle's "
                                         r"dispatch had 3 tokens"):
        ops.cached_dispatch(x[:2], None, out[5], buf.group_name)


def test_handle_of_another_group(buf):
    import torch.distributed as dist
    other_group = dist.new_group([0], backend="gloo")
    other = deep_ep_ops.Buffer(other_group, num_max_tokens_per_rank=M, hidden=HID, num_topk=K,
                               num_experts=E)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, other.group_name, E)
    with pytest.raises(ValueError, match=rf"combine: handle belongs to another Buffer: it was "
                                         rf"made by a dispatch on Buffer #{other.id}, and group "
                                         rf"'{buf.group_name}' has Buffer #{buf.id}"):
        ops.combine(out[0], out[5], None, buf.group_name)
    other.destroy()


def test_handle_of_a_destroyed_buffer(single_rank_group):
    kw = dict(num_max_tokens_per_rank=M, hidden=HID, num_topk=K, num_experts=E)
    first = deep_ep_ops.Buffer(single_rank_group, **kw)
    x, idx, w = _inputs()
    out = ops.dispatch(x, None, idx, w, first.group_name, E)
    first.destroy()
    second = deep_ep_ops.Buffer(single_rank_group, **kw)
    with pytest.raises(ValueError, match=r"cached_dispatch: handle belongs to another Buffer"):
        ops.cached_dispatch(x, None, out[5], second.group_name)
    second.destroy()


def test_engram_without_table(buf):
    with pytest.raises(ValueError, match=r"has no Engram table"):
        ops.engram_fetch(torch.randn(4, 2), torch.zeros(1, 1, dtype=torch.int64),
                         buf.group_name)


def test_engram_wrong_table(buf):
    buf.engram_table(4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"table must be the registered shard \(4, 2\)"):
        ops.engram_fetch(torch.randn(5, 2), torch.zeros(1, 1, dtype=torch.int64),
                         buf.group_name)


def test_engram_index_out_of_range(buf):
    table = buf.engram_table(4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"indices must be row ids in \[-1, R\*n = 4\)"):
        ops.engram_fetch(table, torch.tensor([[0, 4]]), buf.group_name)


def test_pp_peer_out_of_range(buf):
    with pytest.raises(ValueError, match=r"pp_send_recv: dst must be a rank in \[0, 1\)"):
        ops.pp_send_recv(torch.randn(2), 1, 0, [2], torch.float32, buf.group_name)


def test_pp_no_peer(buf):
    with pytest.raises(ValueError, match=r"at least one peer"):
        ops.pp_send_recv(torch.randn(2), -1, -1, [2], torch.float32, buf.group_name)


def test_pp_recv_shape_mismatch(buf):
    with pytest.raises(ValueError, match=r"does not match recv_shape"):
        ops.pp_send_recv(torch.randn(2), 0, 0, [3], torch.float32, buf.group_name)


def test_reduce_scatter_not_divisible(single_rank_group, monkeypatch):
    b = deep_ep_ops.Buffer(single_rank_group, num_max_tokens_per_rank=M, hidden=HID,
                           num_topk=K, num_experts=E)
    try:
        monkeypatch.setattr(b, "world_size", 2)  # a 1-rank group divides everything
        with pytest.raises(ValueError, match=r"cp_reduce_scatter: x must be dim 0 divisible"):
            ops.cp_reduce_scatter(torch.randn(3, 2), b.group_name)
    finally:
        b.destroy()


def test_buffer_experts_not_divisible(single_rank_group, monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by the group size 4"):
        deep_ep_ops.Buffer(single_rank_group, num_max_tokens_per_rank=M, hidden=HID,
                           num_topk=K, num_experts=6)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_buffer_direct_outputs(single_rank_group, bad):
    with pytest.raises(ValueError, match=r"direct_outputs must be an int >= 0, got "):
        deep_ep_ops.Buffer(single_rank_group, num_max_tokens_per_rank=M, hidden=HID,
                           num_topk=K, num_experts=E, direct_outputs=bad)


def test_combine_input(buf):
    """CPU: a new tensor of the asked shape (CUDA: a combine-input slot,
    tests/gpu/test_combine_input_gpu.py); bad sizes name the arguments."""
    t = buf.combine_input(5)
    assert t.shape == (5, HID) and t.dtype == torch.bfloat16
    assert buf.combine_input(3, 4, torch.float32).shape == (3, 4)
    for bad in ((-1,), (2, 0), (1.5,)):
        with pytest.raises(ValueError, match=r"combine_input: num_rows must be an int >= 0 and "
                                             r"width an int >= 1"):
            buf.combine_input(*bad)


def test_buffer_twice(buf):
    with pytest.raises(RuntimeError, match=r"already has a Buffer"):
        deep_ep_ops.Buffer(buf.group, num_max_tokens_per_rank=M, hidden=HID, num_topk=K,
                           num_experts=E)


def test_wrong_device(buf):
    """A CUDA tensor on a gloo (CPU) group is refused, naming the argument (checked on a
    stand-in because CI has no GPU)."""
    with pytest.raises(ValueError, match=r"dispatch: x must be on cpu"):
        deep_ep_ops.validation.check_device("dispatch", buf, x=_FakeCuda())


class _FakeCuda:
    device = torch.device("cuda", 0)
    is_cuda, is_meta = True, False
    shape = (1,)
    dtype = torch.float32
