// Engram kernels: the zero-copy fetch of table rows from their owners' windows, and the three
// steps of its backward (stage this rank's row gradients in its window; the owners build sort
// keys of the contributions to their rows; sum them in a fixed order).
//
// Ordering with table writes. fetch epoch e: every rank announces "entered e" (so its earlier
// stream work, table updates included, is done) before any CTA reads remote rows, and every
// CTA waits for the owners' announcements first. The last CTA to finish announces "done e" and
// waits for every peer's "done e": when a rank's fetch kernel ends nobody reads its table any
// more, so the owner's later writes (an optimizer step) cannot race a peer's reads.
#include "../device/accumulate.cuh"
#include "channel_sync.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace deep_ep_ops {
namespace {

using dev::Acc;
using dev::from_acc;
using dev::to_acc;

constexpr int kThreads = 256;
constexpr int kRowsInFlight = 4;

__device__ __forceinline__ int64_t load_index(const void* idx, int idx64, int64_t i) {
  return idx64 ? static_cast<const int64_t*>(idx)[i]
               : static_cast<int64_t>(static_cast<const int32_t*>(idx)[i]);
}

// Every CTA: wait (threads < R) until every rank raised `kind` to `epoch`. False on failure.
__device__ __forceinline__ bool cta_wait_all(const ChannelComm& c, int kind, uint32_t epoch,
                                             int op) {
  __shared__ int ok;
  if (threadIdx.x == 0) ok = 1;
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < c.num_ranks &&
      !chan::wait_geq(chan::my_flag(c, kind, threadIdx.x), epoch, c, op, threadIdx.x))
    ok = 0;
  __syncthreads();
  return ok != 0;
}

// One thread: raise `kind` to `epoch` at every rank (after this rank's earlier stores).
__device__ __forceinline__ void announce(const ChannelComm& c, int kind, uint32_t epoch) {
  dev::release_flags_sys(c.num_ranks, [&](int p) { return chan::peer_flag(c, p, kind); }, epoch);
}

// Thread 0: true for the last CTA of the grid to get here (it then resets the ticket).
__device__ __forceinline__ bool last_cta(uint32_t* ticket) {
  __threadfence();
  const uint32_t t = atomicAdd(ticket, 1u);
  if (t + 1u == gridDim.x) {
    *ticket = 0u;
    return true;
  }
  return false;
}

// Team of `lanes` threads copies rows of 16-byte words: loads of kRowsInFlight rows first.
__device__ __forceinline__ void fetch_rows_vec(const EngramFetchParams& p, int64_t first_row,
                                               int64_t row_step, int lane, int lanes,
                                               int64_t limit, bool* bad, int64_t* bad_value) {
  const int64_t words = p.t.row_bytes / 16;
  for (int64_t r0 = first_row; r0 < p.num_rows; r0 += row_step * kRowsInFlight) {
    const int4* src[kRowsInFlight];
    int4* dst[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int64_t r = r0 + u * row_step;
      src[u] = nullptr;
      dst[u] = nullptr;
      if (r < p.num_rows) {
        const int64_t g = load_index(p.indices, p.idx64, r);
        dst[u] = reinterpret_cast<int4*>(p.out + r * p.t.row_bytes);
        if (g >= 0 && g < limit) {
          const int64_t owner = g / p.t.n;
          src[u] = reinterpret_cast<const int4*>(p.t.peer_base[owner] +
                                                 (g - owner * p.t.n) * p.t.row_bytes);
        } else if (g != -1) {
          *bad = true;
          *bad_value = g;
        }
      }
    }
    for (int64_t w = lane; w < words; w += lanes) {
      int4 v[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u)
        v[u] = src[u] != nullptr ? __ldcg(src[u] + w) : make_int4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u)
        if (dst[u] != nullptr) dst[u][w] = v[u];
    }
  }
}

__global__ void __launch_bounds__(kThreads) engram_fetch_kernel(const __grid_constant__ EngramFetchParams p) {
  const ChannelComm& c = p.comm;
  const uint32_t epoch = c.ctr->eg_fetch_epoch + 1u;
  // Every CTA announces (the same value, idempotent): no CTA then depends on another CTA of
  // this grid being scheduled, even when the grid is larger than what is resident at once.
  if (threadIdx.x == 0) announce(c, kFlagEgEnter, epoch);
  const bool ok = cta_wait_all(c, kFlagEgEnter, epoch, kOpEgEnter);
  const int64_t limit = p.t.n * c.num_ranks;
  bool bad = false;
  int64_t bad_value = 0;
  if (ok) {
    if (p.t.row_bytes % 16 == 0) {
      // teams of 8/16/32 lanes: a 256-byte bf16 row of H = 128 is one 16-lane pass
      int lanes = 32;
      while (lanes > 8 && static_cast<int64_t>(lanes) * 16 > p.t.row_bytes) lanes /= 2;
      const int teams_per_cta = kThreads / lanes;
      const int team = threadIdx.x / lanes, lane = threadIdx.x % lanes;
      const int64_t first = static_cast<int64_t>(blockIdx.x) * teams_per_cta + team;
      const int64_t step = static_cast<int64_t>(gridDim.x) * teams_per_cta;
      fetch_rows_vec(p, first, step, lane, lanes, limit, &bad, &bad_value);
    } else {
      const int warps = kThreads / 32;
      for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + dev::warp_id(); r < p.num_rows;
           r += static_cast<int64_t>(gridDim.x) * warps) {
        const int64_t g = load_index(p.indices, p.idx64, r);
        char* dst = p.out + r * p.t.row_bytes;
        if (g >= 0 && g < limit) {
          const int64_t owner = g / p.t.n;
          dev::warp_copy(dst, p.t.peer_base[owner] + (g - owner * p.t.n) * p.t.row_bytes,
                         p.t.row_bytes);
        } else {
          if (g != -1) {
            bad = true;
            bad_value = g;
          }
          dev::warp_zero(dst, p.t.row_bytes);
        }
      }
    }
  }
  if (bad)  // the row is zero; the host raises at the next call, naming the index
    chan::report(c, kErrBadIndex, kOpEgEnter, -1, static_cast<uint32_t>(bad_value),
                static_cast<uint32_t>(static_cast<uint64_t>(bad_value) >> 32));
  __syncthreads();
  if (threadIdx.x == 0 && last_cta(&c.ctr->eg_fetch_ticket)) {
    announce(c, kFlagEgDone, epoch);
    for (int q = 0; q < c.num_ranks; ++q)
      if (!chan::wait_geq(chan::my_flag(c, kFlagEgDone, q), epoch, c, kOpEgDone, q)) break;
    c.ctr->eg_fetch_epoch = epoch;
  }
}

// Stage this rank's gradient rows and global indices in its table window (peers read them).
__global__ void __launch_bounds__(kThreads) engram_stage_kernel(const __grid_constant__ EngramStageParams p) {
  const ChannelComm& c = p.comm;
  char* base = p.t.peer_base[c.rank];
  int64_t* idx_out = reinterpret_cast<int64_t*>(base + p.t.idx_off);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < p.num_rows; i += nthreads) idx_out[i] = load_index(p.indices, p.idx64, i);
  const int warps = kThreads / 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + dev::warp_id(); r < p.num_rows;
       r += static_cast<int64_t>(gridDim.x) * warps)
    dev::warp_copy(base + p.t.rows_off + r * p.t.row_bytes, p.grad + r * p.t.row_bytes,
                   p.t.row_bytes);
  if (tid == 0) *reinterpret_cast<int64_t*>(base + p.t.count_off) = p.num_rows;
  __syncthreads();
  if (threadIdx.x == 0 && last_cta(&c.ctr->eg_stage_ticket))
    announce(c, kFlagEgStaged, c.ctr->eg_sum_epoch + 1u);
}

// Sort keys of every contribution to this rank's rows: (local row << 32) | (src rank * cap + j)
// for position j of src rank's staged indices; other positions get INT64_MAX. Sorting the keys
// orders each row's contributions by (source rank, position): the CPU reference's order.
__global__ void __launch_bounds__(kThreads) engram_keys_kernel(const __grid_constant__ EngramKeysParams p) {
  const ChannelComm& c = p.comm;
  const uint32_t epoch = c.ctr->eg_sum_epoch + 1u;
  const bool ok = cta_wait_all(c, kFlagEgStaged, epoch, kOpEgStaged);
  __shared__ int64_t counts[kMaxRanks];
  if (static_cast<int>(threadIdx.x) < c.num_ranks)
    counts[threadIdx.x] =
        ok ? __ldcg(reinterpret_cast<const long long*>(p.t.peer_base[threadIdx.x] + p.t.count_off))
           : 0;
  __syncthreads();
  const int64_t cap = p.t.max_rows;
  const int64_t lo = static_cast<int64_t>(c.rank) * p.t.n;
  const int64_t total = cap * c.num_ranks;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(i / cap);
    const int64_t j = i - r * cap;
    int64_t key = INT64_MAX;
    if (j < counts[r]) {
      const int64_t g = __ldcg(reinterpret_cast<const long long*>(p.t.peer_base[r] + p.t.idx_off) + j);
      if (g >= lo && g < lo + p.t.n) key = ((g - lo) << 32) | i;
    }
    p.keys[i] = key;
  }
}

template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &b, 2);
    return v;
  } else if constexpr (sizeof(T) == 4) {
    const unsigned int b = __ldcg(reinterpret_cast<const unsigned int*>(p));
    T v;
    memcpy(&v, &b, 4);
    return v;
  } else {
    const unsigned long long b = __ldcg(reinterpret_cast<const unsigned long long*>(p));
    T v;
    memcpy(&v, &b, 8);
    return v;
  }
}

// One warp per head of a run of equal rows in the sorted keys: out[row] = ((0 + c0) + c1) + ...
// over the run's contributions in key order, accumulated in fp32 (fp64 for fp64), rounded once.
template <typename T>
__device__ __forceinline__ void sum_runs(const EngramSumParams& p) {
  using A = typename Acc<T>::type;
  constexpr int kCols = 4;  // columns per lane per pass
  const ChannelComm& c = p.comm;
  const int warps = kThreads / 32;
  const int lane = dev::lane_id();
  const int64_t cap = p.t.max_rows;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + dev::warp_id(); i < p.num_keys;
       i += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t key = p.keys[i];
    if (key == INT64_MAX) break;  // sorted: only sentinels follow
    const int64_t row = key >> 32;
    if (i > 0 && (p.keys[i - 1] >> 32) == row) continue;  // not the head of its run
    int64_t end = i + 1;
    while (end < p.num_keys && p.keys[end] != INT64_MAX && (p.keys[end] >> 32) == row) ++end;
    T* out = reinterpret_cast<T*>(p.out) + row * p.hidden;
    for (int64_t col0 = 0; col0 < p.hidden; col0 += 32 * kCols) {
      A acc[kCols];
#pragma unroll
      for (int u = 0; u < kCols; ++u) acc[u] = A(0);
      for (int64_t k = i; k < end; ++k) {
        const int64_t pos = p.keys[k] & 0xffffffffLL;
        const int r = static_cast<int>(pos / cap);
        const int64_t j = pos - r * cap;
        const T* src = reinterpret_cast<const T*>(p.t.peer_base[r] + p.t.rows_off + j * p.t.row_bytes);
#pragma unroll
        for (int u = 0; u < kCols; ++u) {
          const int64_t col = col0 + u * 32 + lane;
          if (col < p.hidden) acc[u] = acc[u] + to_acc<T>(load_cg(src + col));
        }
      }
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        const int64_t col = col0 + u * 32 + lane;
        if (col < p.hidden) out[col] = from_acc<T>(acc[u]);
      }
    }
  }
  (void)c;
}

__global__ void __launch_bounds__(kThreads) engram_sum_kernel(const __grid_constant__ EngramSumParams p) {
  const ChannelComm& c = p.comm;
  const uint32_t epoch = c.ctr->eg_sum_epoch + 1u;
  if (!chan::failed(c)) {
    switch (p.dtype) {
      case kF32: sum_runs<float>(p); break;
      case kBF16: sum_runs<__nv_bfloat16>(p); break;
      case kF16: sum_runs<__half>(p); break;
      case kF64: sum_runs<double>(p); break;
      default: break;
    }
  }
  __syncthreads();
  // The stagings may be overwritten by the next backward only after every owner read them.
  if (threadIdx.x == 0 && last_cta(&c.ctr->eg_sum_ticket)) {
    announce(c, kFlagEgSumDone, epoch);
    for (int q = 0; q < c.num_ranks; ++q)
      if (!chan::wait_geq(chan::my_flag(c, kFlagEgSumDone, q), epoch, c, kOpEgSumDone, q)) break;
    c.ctr->eg_sum_epoch = epoch;
  }
}

}  // namespace

cudaError_t launch_engram_fetch(const EngramFetchParams& p, cudaStream_t stream) {
  engram_fetch_kernel<<<p.grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_engram_stage(const EngramStageParams& p, cudaStream_t stream) {
  engram_stage_kernel<<<p.grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_engram_keys(const EngramKeysParams& p, cudaStream_t stream) {
  const int64_t total = p.t.max_rows * p.comm.num_ranks;
  const int grid = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(1, (total + kThreads - 1) / kThreads)));
  engram_keys_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_engram_sum(const EngramSumParams& p, cudaStream_t stream) {
  engram_sum_kernel<<<p.grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
