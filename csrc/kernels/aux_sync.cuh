// Device-side signalling of the aux ops (pp / cp / engram): flag addresses in the aux window,
// waits with a timeout that records which peer stalled, and CTA-wide byte copies.
//
// Flags only grow (sequence numbers / epochs kept in device memory) or are set and reset by
// the same protocol step, so no host value is baked into a launch and graph replays stay in
// step with the peers.
#pragma once

#include <cstdint>
#include <cstdio>

#include "aux_launch.hpp"
#include "common.cuh"

namespace deep_ep_ops {
namespace aux {

__device__ __forceinline__ uint32_t* flag_at(char* window_base, int kind, int rank) {
  return reinterpret_cast<uint32_t*>(window_base) + kind * kMaxRanks + rank;
}
// This rank's own flag word [kind][from].
__device__ __forceinline__ uint32_t* my_flag(const AuxComm& c, int kind, int from) {
  return flag_at(c.peer_base[c.rank], kind, from);
}
// Rank `to`'s flag word [kind][this rank].
__device__ __forceinline__ uint32_t* peer_flag(const AuxComm& c, int to, int kind) {
  return flag_at(c.peer_base[to], kind, c.rank);
}

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// A fatal error (timeout, pp size mismatch) is pending. A bad Engram index is not fatal: the
// protocol stayed intact, so waits and the backward's sums must go on as usual (aborting them
// would skip copies and zero gradients while the host says the Buffer goes on).
__device__ __forceinline__ bool fatal_code(int code) {
  return code != 0 && code != kAuxBadIndex;
}
__device__ __forceinline__ bool failed(const AuxComm& c) {
  return c.error != nullptr && fatal_code(*reinterpret_cast<volatile int*>(&c.error->code));
}

__device__ __forceinline__ const char* op_name(int op) {
  switch (op) {
    case kOpPpInlineSend: return "pp_send_recv (inline send: waiting for a free slot)";
    case kOpPpInlineRecv: return "pp_send_recv (inline recv: waiting for the message)";
    case kOpPpBulkSend: return "pp_send_recv (bulk send: waiting for the slot)";
    case kOpPpBulkRecv: return "pp_send_recv (bulk recv: waiting for the message)";
    case kOpCpInline: return "cp collective (inline)";
    case kOpCpReady: return "cp collective (data ready)";
    case kOpCpDone: return "cp collective (reads done)";
    case kOpEgEnter: return "engram_fetch (entry)";
    case kOpEgDone: return "engram_fetch (reads done)";
    case kOpEgStaged: return "engram backward (gradients staged)";
    case kOpEgSumDone: return "engram backward (reads done)";
    default: return "aux op";
  }
}

// First error wins, except that a fatal one replaces a pending bad Engram index (else a later
// timeout would be reported as "bad index, the Buffer goes on"). Plain stores: atomics on host
// memory need PCIe atomics; two reporters racing is benign. The code is stored last, after a
// fence, so the host never reads a code with the fields of no or another error. Timeouts
// print; the host raises naming the peer at the next call.
static __device__ __noinline__ void report(const AuxComm& c, int code, int op, int peer,
                                           uint32_t expected, uint32_t seen) {
  ErrorRecord* e = c.error;
  if (e == nullptr) return;
  const int pending = *reinterpret_cast<volatile int*>(&e->code);
  if (pending != 0 && (fatal_code(pending) || !fatal_code(code))) return;
  volatile ErrorRecord* v = e;
  v->rank = c.rank;
  v->peer = peer;
  v->slot = 0;
  v->expected = expected;
  v->seen = seen;
  v->op = op;
  __threadfence_system();
  v->code = code;
  __threadfence_system();
  if (code == kAuxTimeout) {
    printf("[deep_ep_ops] rank %d: GPU timeout in %s waiting for peer rank %d (expected %u, "
           "saw %u). The peer did not make the matching call; this Buffer is now unusable.\n",
           c.rank, op_name(op), peer, expected, seen);
    if (c.trap_on_timeout) __trap();
  }
}

// One thread: spin until `pred(*f)`; false (and the record filled) after the timeout, or at
// once when another wait of this Buffer already failed (no second full timeout).
template <typename Pred>
__device__ __forceinline__ bool wait_until(const uint32_t* f, Pred pred, const AuxComm& c,
                                           int op, int peer, uint32_t expected) {
  uint32_t seen = dev::ld_acquire_sys(f);
  if (pred(seen)) return true;
  const unsigned long long start = now_ns();
  unsigned iter = 0;
  while (!pred(seen = dev::ld_acquire_sys(f))) {
    if ((++iter & 1023u) == 0) {
      if (now_ns() - start > c.timeout_ns) {
        report(c, kAuxTimeout, op, peer, expected, seen);
        return false;
      }
      if (failed(c)) return false;
    }
  }
  return true;
}

__device__ __forceinline__ bool wait_geq(const uint32_t* f, uint32_t want, const AuxComm& c,
                                         int op, int peer) {
  return wait_until(f, [want](uint32_t v) { return static_cast<int>(v - want) >= 0; }, c, op,
                    peer, want);
}

// Every thread of the CTA: announce `epoch` on flag `kind` to every rank (after this CTA's
// stores), then wait until every rank announced it here. False if a wait failed.
__device__ __forceinline__ bool cta_all_ranks(const AuxComm& c, int kind, uint32_t epoch,
                                              int op) {
  __shared__ int ok;
  __syncthreads();
  if (threadIdx.x == 0) {
    ok = 1;
    __threadfence_system();  // this CTA's (and earlier kernels') stores before the flag
    for (int p = 0; p < c.num_ranks; ++p) dev::st_release_sys(peer_flag(c, p, kind), epoch);
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

}  // namespace aux
}  // namespace deep_ep_ops
