// The one device sync layer of every op family: waits on a flag with a timeout (one clock, the
// GPU's global timer in ns), the error record a failed wait fills, and the check that stops a
// wait early once another wait of the same Buffer failed. Families build their barriers on
// these (ep/ep_barrier.cuh, channels/channel_sync.cuh).
#pragma once

#include <cstdint>
#include <cstdio>

#include "common.cuh"
#include "shared_types.hpp"

namespace deep_ep_ops {
namespace dev {

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// A fatal error (timeout, pp size mismatch) is pending. A bad Engram index is not fatal: the
// protocol stayed intact, so waits and sums must go on as usual.
__device__ __forceinline__ bool fatal_code(int code) { return code != 0 && code != kErrBadIndex; }

// True once a wait of this Buffer failed (host-mapped: read rarely, it crosses PCIe).
__device__ __forceinline__ bool failed(const WaitContext& w) {
  return w.error != nullptr && fatal_code(*reinterpret_cast<volatile int*>(&w.error->code));
}

// Records a failure: the first wins, except that a fatal one replaces a pending bad Engram index
// (else a later timeout would read as "bad index, the Buffer goes on"). Plain stores (atomics on
// host memory need PCIe atomics; two reporters racing is benign); the code goes last, after a
// fence, so the host never reads a code with the fields of another error. Timeouts print and,
// when asked, trap; the host raises at the next call either way. Takes the context by value: a
// reference to a kernel parameter in a non-inlined call makes the compiler copy the whole
// parameter struct to every thread's local memory.
static __device__ __noinline__ void record_failure(WaitContext w, int code, int op, int slot,
                                                   int peer, uint32_t expected, uint32_t seen) {
  ErrorRecord* e = w.error;
  if (e != nullptr) {
    const int pending = *reinterpret_cast<volatile int*>(&e->code);
    if (pending != 0 && (fatal_code(pending) || !fatal_code(code))) return;
    volatile ErrorRecord* v = e;
    v->rank = w.rank;
    v->peer = peer;
    v->slot = slot;
    v->expected = expected;
    v->seen = seen;
    v->op = op;
    __threadfence_system();
    v->code = code;
    __threadfence_system();
  }
  if (code != kErrTimeout) return;
  if (op == kOpLocalTiles)  // a wait inside one kernel: slot = the tile
    printf("[deep_ep_ops] rank %d: GPU timeout in %s: tile %d of the same kernel never counted "
           "(call tag %u, saw %u). This Buffer is now unusable.\n",
           w.rank, wait_site_text(op), slot, expected, seen);
  else
    printf("[deep_ep_ops] rank %d: GPU timeout in %s waiting for peer rank %d (slot %d, "
           "expected %u, saw %u). The peer did not make the matching call; this Buffer is now "
           "unusable.\n", w.rank, wait_site_text(op), peer, slot, expected, seen);
  if (w.trap_on_timeout) __trap();
}

// One thread: spin until pred(*f) (a 4-byte flag, or an 8-byte word whose high half says
// whether its low half is there yet); false (and the record filled, with the flag or the word's
// high half as seen) after the timeout, or at once when another wait of this Buffer already
// failed (no second full timeout). Reads are acquires at system scope; `last`: what the
// final read saw.
template <typename Word, typename Pred>
__device__ __forceinline__ bool timed_wait(const Word* f, Pred pred, const WaitContext& w,
                                           int op, int slot, int peer, uint32_t expected,
                                           Word* last = nullptr) {
  Word seen = ld_acquire_sys(f);
  if (last != nullptr) *last = seen;
  if (pred(seen)) return true;
  const unsigned long long start = now_ns();
  unsigned iter = 0;
  while (!pred(seen = ld_acquire_sys(f))) {
    if (w.poll_pause_ns != 0) __nanosleep(w.poll_pause_ns);
    if ((++iter & 1023u) == 0) {
      if (now_ns() - start > w.timeout_ns) {
        record_failure(w, kErrTimeout, op, slot, peer, expected,
                       static_cast<uint32_t>(seen >> (sizeof(Word) > 4 ? 32 : 0)));
        return false;
      }
      if (failed(w)) return false;
    }
  }
  if (last != nullptr) *last = seen;
  return true;
}

// Until *f reached epoch `want` (epochs only grow; wrap-around safe).
__device__ __forceinline__ bool wait_epoch(const uint32_t* f, uint32_t want, const WaitContext& w,
                                           int op, int slot, int peer) {
  return timed_wait(f, [want](uint32_t v) { return static_cast<int>(v - want) >= 0; }, w, op,
                    slot, peer, want);
}

// An 8-byte word that is its own flag: `value` in the low half, `epoch` in the high half (what
// wait_epoch_word waits for), stored at once by its writer.
__device__ __forceinline__ unsigned long long epoch_word(uint32_t epoch, uint32_t value) {
  return (static_cast<unsigned long long>(epoch) << 32) | value;
}

// Until the 8-byte word at f carries `epoch` in its high half (its writer stored the value and
// the epoch as one word: no fence or flag of its own); the low half, or -1 after a failed wait.
__device__ __forceinline__ long long wait_epoch_word(const unsigned long long* f, uint32_t epoch,
                                                     const WaitContext& w, int op, int slot,
                                                     int peer) {
  unsigned long long v = 0;
  const bool ok = timed_wait(f, [epoch](unsigned long long x) { return (x >> 32) == epoch; }, w,
                             op, slot, peer, epoch, &v);
  return ok ? static_cast<long long>(static_cast<uint32_t>(v)) : -1;
}

}  // namespace dev
}  // namespace deep_ep_ops
