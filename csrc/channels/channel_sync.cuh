// Device-side signalling of the channel ops (pp / cp / engram): flag addresses in the channel
// window, the waits and failure records of device/wait.cuh bound to a ChannelComm, and
// CTA-wide byte copies.
//
// Flags only grow (sequence numbers / epochs kept in device memory) or are set and reset by
// the same protocol step, so no host value is baked into a launch and graph replays stay in
// step with the peers.
#pragma once

#include <cstdint>

#include "../device/common.cuh"
#include "../device/wait.cuh"
#include "channel_launch.hpp"

namespace deep_ep_ops {
namespace chan {

__device__ __forceinline__ uint32_t* flag_at(char* window_base, int kind, int rank) {
  return reinterpret_cast<uint32_t*>(window_base) + kind * kMaxRanks + rank;
}
// This rank's own flag word [kind][from].
__device__ __forceinline__ uint32_t* my_flag(const ChannelComm& c, int kind, int from) {
  return flag_at(c.peer_base[c.rank], kind, from);
}
// Rank `to`'s flag word [kind][this rank].
__device__ __forceinline__ uint32_t* peer_flag(const ChannelComm& c, int to, int kind) {
  return flag_at(c.peer_base[to], kind, c.rank);
}

__device__ __forceinline__ bool failed(const ChannelComm& c) { return dev::failed(c.wait); }

__device__ __forceinline__ void report(const ChannelComm& c, int code, int op, int peer,
                                       uint32_t expected, uint32_t seen) {
  dev::record_failure(c.wait, code, op, /*slot=*/0, peer, expected, seen);
}

template <typename Pred>
__device__ __forceinline__ bool wait_until(const uint32_t* f, Pred pred, const ChannelComm& c,
                                           int op, int peer, uint32_t expected) {
  return dev::timed_wait(f, pred, c.wait, op, /*slot=*/0, peer, expected);
}

__device__ __forceinline__ bool wait_geq(const uint32_t* f, uint32_t want, const ChannelComm& c,
                                         int op, int peer) {
  return dev::wait_epoch(f, want, c.wait, op, /*slot=*/0, peer);
}

// Every thread of the CTA: announce `epoch` on flag `kind` to every rank (after this CTA's
// stores), then wait until every rank announced it here. False if a wait failed.
__device__ __forceinline__ bool cta_all_ranks(const ChannelComm& c, int kind, uint32_t epoch,
                                              int op) {
  __shared__ int ok;
  __syncthreads();
  if (threadIdx.x == 0) {
    ok = 1;
    // this CTA's (and earlier kernels') stores before the flag
    dev::release_flags_sys(c.num_ranks, [&](int p) { return peer_flag(c, p, kind); }, epoch);
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < c.num_ranks) {
    if (!wait_geq(my_flag(c, kind, threadIdx.x), epoch, c, op, threadIdx.x)) ok = 0;
  }
  __syncthreads();
  return ok != 0;
}

// CTA-wide byte copy (any alignment; 16-byte accesses when both pointers and n allow).
// Loads bypass L1 (.cg): the source may be memory a peer wrote earlier.
__device__ __forceinline__ void cta_copy(char* dst, const char* src, int64_t n) {
  const uint64_t m = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src);
  int64_t done = 0;
  if ((m & 15) == 0) {
    const int64_t v = n / 16;
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    int64_t i = threadIdx.x;
    const int64_t step = blockDim.x;
    for (; i + 3 * step < v; i += 4 * step) {  // four loads in flight before the stores
      int4 a = __ldcg(s + i), b = __ldcg(s + i + step), e = __ldcg(s + i + 2 * step),
           f = __ldcg(s + i + 3 * step);
      d[i] = a;
      d[i + step] = b;
      d[i + 2 * step] = e;
      d[i + 3 * step] = f;
    }
    for (; i < v; i += step) d[i] = __ldcg(s + i);
    done = v * 16;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) dst[i] = __ldcg(src + i);
}

}  // namespace chan
}  // namespace deep_ep_ops
