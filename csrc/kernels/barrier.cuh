// Cross-rank barrier of one CTA with the CTAs of the same index on every peer.
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

#include <cstdio>

#include "common.cuh"

namespace deep_ep_ops {
namespace dev {

__device__ __forceinline__ uint32_t* flag_ptr(char* window_base, const Comm& c, int slot,
                                              int from_rank) {
  return reinterpret_cast<uint32_t*>(window_base + c.flags_off) + slot * kMaxRanks + from_rank;
}

// Takes plain values, not the Comm: a reference to a kernel parameter passed to a non-inlined
// function makes the compiler copy the whole parameter struct into every thread's local memory.
static __device__ __noinline__ void report_timeout_at(ErrorRecord* e, int rank, int trap,
                                                      int op, int slot, int peer,
                                                      uint32_t expected, uint32_t seen) {
  if (e != nullptr && *reinterpret_cast<volatile int*>(&e->code) == 0) {
    // Plain stores: atomics on host memory need PCIe atomics. Two reporters racing is benign.
    volatile ErrorRecord* v = e;
    v->code = 1;
    v->rank = rank;
    v->peer = peer;
    v->slot = slot;
    v->expected = expected;
    v->seen = seen;
    v->op = op;
    __threadfence_system();
  }
  const char* names[] = {"?", "dispatch (count exchange)", "dispatch (data push)",
                         "cached_dispatch (staging)", "cached_dispatch (pull)",
                         "combine (push)"};
  if (op == kOpLocalTiles)  // a wait inside one kernel (local_dispatch.cu): slot = the tile
    printf("[deep_ep_ops] rank %d: GPU timeout in dispatch (one rank) waiting for the count of "
           "tile %d of the same kernel (call tag %u, saw %u): its CTA never ran to that point. "
           "This Buffer is now unusable.\n", rank, slot, expected, seen);
  else
    printf("[deep_ep_ops] rank %d: GPU timeout in %s waiting for peer rank %d "
           "(barrier slot %d, expected epoch %u, saw %u). The peer did not enter the same "
           "collective call; this Buffer is now unusable.\n",
           rank, names[(op >= 1 && op <= 5) ? op : 0], peer, slot, expected, seen);
  // By default the kernel finishes (outputs are garbage) and the host raises at the next call
  // on this Buffer, so the process stays healthy enough to report; a trap kills the context.
  if (trap) __trap();
}

static __device__ __forceinline__ void report_timeout(const Comm& c, int op, int slot, int peer,
                                                      uint32_t expected, uint32_t seen) {
  report_timeout_at(c.error, c.rank, c.trap_on_timeout, op, slot, peer, expected, seen);
}

// True once any wait of this Buffer timed out (host-mapped; read rarely, it crosses PCIe).
__device__ __forceinline__ bool failed(const Comm& c) {
  return c.error != nullptr && *reinterpret_cast<volatile int*>(&c.error->code) != 0;
}

// Every thread of the CTA must call this. With one rank there is nobody to announce to or
// wait for: the CTA-wide sync is the whole barrier (the system fence and the flag round trip
// cost ~2.4 us on H100 for nothing).
__device__ __forceinline__ void cta_barrier(const Comm& c, int slot, int op) {
  __syncthreads();
  if (c.num_ranks == 1) return;
  const uint32_t epoch = *reinterpret_cast<volatile unsigned*>(c.epochs + slot) + 1u;
  if (threadIdx.x == 0) {
    // Make every store of this CTA (ordered before us by __syncthreads) visible system-wide
    // before the flag that announces them.
    __threadfence_system();
    for (int p = 0; p < c.num_ranks; ++p) st_release_sys(flag_ptr(peer_ptr(c, p), c, slot, c.rank), epoch);
  }
  if (threadIdx.x < c.num_ranks) {
    const int peer = threadIdx.x;
    const uint32_t* f = flag_ptr(peer_ptr(c, c.rank), c, slot, peer);
    uint32_t seen = ld_acquire_sys(f);
    if (static_cast<int>(seen - epoch) < 0) {
      const long long start = clock64();
      long long next_check = start + (1LL << 20);
      while (static_cast<int>((seen = ld_acquire_sys(f)) - epoch) < 0) {
        const long long now = clock64();
        if (now - start > c.timeout_cycles) {
          report_timeout(c, op, slot, peer, epoch, seen);
          break;
        }
        if (now > next_check) {  // another wait already failed: do not wait a timeout each
          if (failed(c)) break;
          next_check = now + (1LL << 20);
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) c.epochs[slot] = epoch;
}

}  // namespace dev
}  // namespace deep_ep_ops
