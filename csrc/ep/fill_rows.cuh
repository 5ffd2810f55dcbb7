// What dispatch writes into output rows that carry no token (padding is always zero, routing
// columns -1): shared by the push/epilogue kernels and the one-rank fused dispatch.
#pragma once

#include "../device/common.cuh"

namespace deep_ep_ops {
namespace dev {

// Which expert-major row r is: valid (inside its expert's real count) or padding.
__device__ __forceinline__ bool expand_row_valid(const int* tpe, const int* bstart, int E_loc,
                                                 int r) {
  if (r >= __ldg(bstart + E_loc)) return false;
  int lo = 0, hi = E_loc - 1;  // last j with bstart[j] <= r
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(bstart + mid) <= r) lo = mid; else hi = mid - 1;
  }
  return r - __ldg(bstart + lo) < __ldg(tpe + lo);
}

// The outputs a dispatch kernel fills for rows that carry no token.
struct FillArgs {
  const int* recv_info;
  char* recv_x;
  char* recv_s;
  void* recv_idx;
  float* recv_w;
  int* tpe;
  int* recv_h;  // handle receive part
  int64_t x_bytes, s_bytes;
  int C, K, W, E_loc, expand;
};

// Empty compact rows [lo, hi): handle row and topk idx -1, weights 0, x and scales zero.
// `worker` / `workers` number the participating threads (and wworker / wworkers their warps).
__device__ __forceinline__ void zero_compact_rows(const FillArgs& a, int64_t lo, int64_t hi,
                                                  int64_t worker, int64_t workers,
                                                  int64_t wworker, int64_t wworkers) {
  if (hi <= lo) return;
  const int64_t n = hi - lo;
  int* h = a.recv_h + lo * a.W;
  for (int64_t f = worker; f < n * a.W; f += workers) h[f] = -1;
  int64_t* idx = static_cast<int64_t*>(a.recv_idx) + lo * a.K;
  float* w = a.recv_w + lo * a.K;
  for (int64_t f = worker; f < n * a.K; f += workers) {
    idx[f] = -1;
    w[f] = 0.f;
  }
  for (int64_t i = lo + wworker; i < hi; i += wworkers) {
    warp_zero(a.recv_x + i * a.x_bytes, a.x_bytes);
    if (a.s_bytes > 0) warp_zero(a.recv_s + i * a.s_bytes, a.s_bytes);
  }
}

// What the outputs of the rows that carry no token hold, plus tokens_per_expert: grid-wide,
// any grid. Compact: rows [G, C). Expert-major: the group columns of rows [G, C) and every
// padding row. Touches nothing the rows' owners (push, epilogue groups) write.
__device__ inline void fill_empty_rows(const FillArgs& a) {
  const int G = a.recv_info[kRecvG];
  const int* tpe = a.recv_info + kRecvTpe;
  const int* bstart = tpe + a.E_loc;
  const int64_t gt = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int warps = blockDim.x / kWarp;
  const int gwarp = blockIdx.x * warps + warp_id();
  const int nwarps = gridDim.x * warps;
  const int W = a.W;
  for (int64_t j = gt; j < a.E_loc; j += nthreads) a.tpe[j] = tpe[j];
  if (!a.expand) {
    zero_compact_rows(a, G, a.C, gt, nthreads, gwarp, nwarps);
    return;
  }
  const int64_t empty = a.C > G ? a.C - G : 0;
  const int gw = W - handle::kGroupSrcRank;  // group columns
  for (int64_t f = gt; f < empty * gw; f += nthreads)
    a.recv_h[(G + f / gw) * W + handle::kGroupSrcRank + f % gw] = -1;
  int* idx = static_cast<int*>(a.recv_idx);
  for (int64_t i = gt; i < a.C; i += nthreads) {
    if (expand_row_valid(tpe, bstart, a.E_loc, static_cast<int>(i))) continue;
    idx[i] = -1;
    a.recv_w[i] = 0.f;
    int* r = a.recv_h + i * W;
#pragma unroll
    for (int c = 0; c <= handle::kRecvGroup; ++c) r[c] = -1;  // per-row columns
  }
  for (int64_t i = gwarp; i < a.C; i += nwarps) {
    if (expand_row_valid(tpe, bstart, a.E_loc, static_cast<int>(i))) continue;
    warp_zero(a.recv_x + i * a.x_bytes, a.x_bytes);
    if (a.s_bytes > 0) warp_zero(a.recv_s + i * a.s_bytes, a.s_bytes);
  }
}

}  // namespace dev
}  // namespace deep_ep_ops
