// Torch-facing entry points of the EP family on CUDA: dispatch (static capacity: exact=True is
// a local trim after it, deep_ep_ops/trim.py), cached_dispatch, combine. One C++ call per op
// keeps host overhead low.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

#include "ep_state.hpp"

namespace deep_ep_ops {

using DispatchOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

DispatchOut dispatch(EpState& st, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                     const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                     int64_t num_experts, int64_t alignment, bool expand, int64_t num_sms);

std::tuple<at::Tensor, at::Tensor> cached_dispatch(EpState& st, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& x_scales,
                                                   const at::Tensor& handle, int64_t num_sms);

at::Tensor combine(EpState& st, const at::Tensor& x, const at::Tensor& handle,
                   const std::optional<at::Tensor>& weights, int64_t num_sms);

// Buffer(zero_copy_combine=True): a [rows, width] tensor of `dtype` at the start of the next
// combine-input slot (the two alternate). Passed as combine's x (without weights), the peers
// read its rows in place.
at::Tensor combine_input(EpState& st, int64_t rows, int64_t width, at::ScalarType dtype);

// Grid of the barrier kernels: the same on every rank (a function of num_sms and the device).
int barrier_ctas(const EpState& st, int64_t num_sms);
// Largest row (bytes) that push kernels move by bulk copies on this Buffer's device
// (DEEP_EP_OPS_BULK_COPY=1): 16 warps' rows in a block's shared memory; 0 below sm_90.
int bulk_row_limit(const EpState& st);

}  // namespace deep_ep_ops
