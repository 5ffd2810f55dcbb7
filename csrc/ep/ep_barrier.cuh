// Cross-rank barrier of one CTA with the CTAs of the same index on every peer (the EP window's
// flags; waits and failure records are the shared device/wait.cuh).
//
// Rank s announces epoch e on slot b by storing e into flags[b][s] of every peer's window
// (release, system scope, after the CTA's own stores); it then waits until every peer's entry
// in its own window reached e (acquire). Epochs live in device memory and only grow, so the
// flags never need a reset and CUDA-graph replays keep counting where the last run stopped.
//
// A CTA may only rely on data that the peers' CTAs of the same index wrote before their
// arrival, or on anything a peer wrote in an earlier kernel (a peer CTA cannot arrive before
// the peer's earlier kernels finished: kernels on one stream run in order).
#pragma once

#include "../device/common.cuh"
#include "../device/wait.cuh"
#include "ep_launch.hpp"

namespace deep_ep_ops {
namespace dev {

__device__ __forceinline__ uint32_t* flag_ptr(char* window_base, const Comm& c, int slot,
                                              int from_rank) {
  return reinterpret_cast<uint32_t*>(window_base + c.flags_off) + slot * kMaxRanks + from_rank;
}

// The two halves of a barrier, for a CTA that needs only some peers' data before going on
// (cta_barrier below is both, for every peer).
// announce_epoch: one thread, after a __syncthreads() that follows the CTA's stores (the system
// fence makes them visible before the flag that announces them).
__device__ __forceinline__ void announce_epoch(const Comm& c, int slot, uint32_t epoch) {
  release_flags_sys(
      c.num_ranks, [&](int p) { return flag_ptr(peer_ptr(c, p), c, slot, c.rank); }, epoch);
}

// Every thread of the CTA: until each peer in `peers` (bit p: rank p) announced `epoch` on
// `slot`. The caller stores the slot's epoch once it is done with it.
__device__ __forceinline__ void wait_epochs(const Comm& c, int slot, uint32_t epoch, unsigned peers,
                                            int op) {
  if (threadIdx.x < c.num_ranks && ((peers >> threadIdx.x) & 1u)) {
    const int peer = threadIdx.x;
    wait_epoch(flag_ptr(peer_ptr(c, c.rank), c, slot, peer), epoch, c.wait, op, slot, peer);
  }
  __syncthreads();
}

// Every thread of the CTA must call this. With one rank there is nobody to announce to or
// wait for: the CTA-wide sync is the whole barrier (the system fence and the flag round trip
// cost ~2.4 us on H100 for nothing).
__device__ __forceinline__ void cta_barrier(const Comm& c, int slot, int op) {
  __syncthreads();
  if (c.num_ranks == 1) return;
  const uint32_t epoch = *reinterpret_cast<volatile unsigned*>(c.epochs + slot) + 1u;
  if (threadIdx.x == 0) announce_epoch(c, slot, epoch);
  wait_epochs(c, slot, epoch, 0xffffffffu, op);
  if (threadIdx.x == 0) c.epochs[slot] = epoch;
}

}  // namespace dev
}  // namespace deep_ep_ops
