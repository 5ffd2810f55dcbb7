// Torch-facing entry points of pp_send_recv, cp_all_gather, cp_reduce_scatter, engram_fetch and
// its backward (one C++ call per op). Inputs were checked in Python (deep_ep_ops/validation.py);
// what only the backend knows (capacities, registered table) is checked here, before launch.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "channel_state.hpp"

namespace deep_ep_ops {

at::Tensor pp_send_recv(ChannelState& st, const at::Tensor& send, int64_t dst, int64_t src,
                        const std::vector<int64_t>& recv_shape, at::ScalarType recv_dtype);

at::Tensor cp_all_gather(ChannelState& st, const at::Tensor& x);
at::Tensor cp_reduce_scatter(ChannelState& st, const at::Tensor& x);
// A view of this rank's all-gather slot: write the input there and pass the view to
// cp_all_gather to skip its staging copy. Valid until the next cp op on this Buffer.
at::Tensor cp_input(ChannelState& st, const std::vector<int64_t>& shape, at::ScalarType dtype,
                    int64_t device);

// Collective: a zero-filled [n, hidden] table shard in a window of its own, plus staging for
// max_rows gradient rows of the backward.
at::Tensor engram_table(ChannelState& st, int64_t n, int64_t hidden, at::ScalarType dtype,
                        int64_t max_rows, int64_t device);
at::Tensor engram_fetch(ChannelState& st, const at::Tensor& table, const at::Tensor& indices);
at::Tensor engram_scatter_add(ChannelState& st, const at::Tensor& grad, const at::Tensor& indices,
                              int64_t num_entries, int64_t hidden);

}  // namespace deep_ep_ops
