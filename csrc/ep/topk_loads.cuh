// Loads of a dispatch's routing inputs (topk_idx in either index dtype, topk_weights).
#pragma once

#include "../device/common.cuh"
#include "ep_launch.hpp"

namespace deep_ep_ops {
namespace dev {

__device__ __forceinline__ int load_expert(const void* idx, bool idx64, int64_t i) {
  return idx64 ? static_cast<int>(static_cast<const int64_t*>(idx)[i])
               : static_cast<const int*>(idx)[i];
}

// Lane k < K gets the expert id and weight of slot k of token t; the other lanes -1 and 0.
__device__ __forceinline__ void load_slot(const DispatchIO& io, int t, int& e, float& wgt) {
  const int k = lane_id();
  e = -1;
  wgt = 0.f;
  if (k < io.K) {
    const int64_t tk = static_cast<int64_t>(t) * io.K + k;
    e = load_expert(io.topk_idx, io.idx64, tk);
    wgt = io.topk_weights[tk];
  }
}

}  // namespace dev
}  // namespace deep_ep_ops
