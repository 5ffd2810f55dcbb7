// One-dimensional bulk copies (the Hopper tensor memory accelerator, sm_90+) between global and
// shared memory, and a warp's row fan-out built on them: the row is loaded once into the warp's
// shared buffer by one bulk load, then every destination lane stores it out by one bulk store.
// The warp holds no row bytes in registers, issues two instructions per row and destination
// instead of one per 16 bytes, and may start the next row's load while the stores drain.
//
// Rules the callers keep: addresses and sizes are multiples of 16 bytes; a buffer is loaded
// again only after the stores that read it have read it (bulk_wait_read).
#pragma once

#include <cstdio>

#include "common.cuh"

namespace deep_ep_ops {
namespace dev {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DEEP_EP_OPS_HAS_BULK_COPY 1
#else
#define DEEP_EP_OPS_HAS_BULK_COPY 0
#endif

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

#if DEEP_EP_OPS_HAS_BULK_COPY
// An mbarrier that completes a phase when one arrival and its expected bytes have landed.
// Shared-memory operands below are 32-bit shared addresses (smem_u32): fewer live registers
// in the loops that keep them.
__device__ __forceinline__ void mbar_init_single(unsigned bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
  // the bulk-copy unit (async proxy) must see the initialised barrier
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ bool mbar_test_parity(unsigned bar, unsigned parity) {
  unsigned done;
  asm volatile(
      "{\n\t.reg .pred p;\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
      "selp.u32 %0, 1, 0, p;\n\t}"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void bulk_load(unsigned smem, const void* gmem, unsigned bytes,
                                          unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem),
      "l"(gmem), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void bulk_store(void* gmem, unsigned smem, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem),
               "r"(smem), "r"(bytes)
               : "memory");
}

// Closes this thread's bulk stores issued since the last commit into one group (an empty group
// when there were none, so every lane of a warp counts the same groups).
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// This thread's groups have read their shared-memory sources (the buffer may be reused).
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// This thread's groups have written their destinations; the fence then orders those writes
// (async proxy) before this thread's later generic accesses, such as a barrier's release.
__device__ __forceinline__ void bulk_wait_written_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}
#endif

// Out of line: keeps the message's stack and registers off the copy loop's path.
static __device__ __noinline__ void bulk_load_timed_out() {
  if (lane_id() == 0)
    printf("deep_ep_ops: a bulk row load did not land within the Buffer's timeout (an "
           "expected-bytes mismatch); stopping the kernel\n");
  __trap();
}

// A warp's bulk fan-out of rows, each made of a data part and an optional scales part. Usage
// per row: load() as early as the source is known, then store() once the destinations are,
// or skip() when there are none; drain() before the kernel announces its writes.
struct WarpBulkFanout {
  unsigned buf;  // this warp's shared buffer (shared address): data part, then scales part
  unsigned bar;  // this warp's mbarrier (shared address)
  unsigned phase;

  // Starts loading a row: n bytes at `data` and ns at `scales` (ns may be 0).
  __device__ __forceinline__ void load(const char* data, unsigned n, const char* scales,
                                       unsigned ns) {
#if DEEP_EP_OPS_HAS_BULK_COPY
    bulk_wait_read_all();  // the previous row's stores have read the buffer
    __syncwarp();
    if (lane_id() == 0) {
      mbar_arrive_expect(bar, n + ns);
      bulk_load(buf, data, n, bar);
      if (ns > 0) bulk_load(buf + n, scales, ns, bar);
    }
#endif
  }

  // Waits for the row load() started. A bulk load from valid memory completes or faults; one
  // that never lands is an expected-bytes bug, so the kernel stops with a message rather than
  // spin.
  __device__ __forceinline__ void wait_loaded(unsigned long long timeout_ns) {
#if DEEP_EP_OPS_HAS_BULK_COPY
    if (!mbar_test_parity(bar, phase)) {
      const unsigned long long start = global_ns();
      while (!mbar_test_parity(bar, phase)) {
        if (global_ns() - start > timeout_ns) bulk_load_timed_out();
      }
    }
    phase ^= 1u;
#endif
  }

  // Stores the loaded row: lanes set in `lanes` each to their own data / scales destination.
  __device__ __forceinline__ void store(unsigned lanes, char* data_dst, unsigned n,
                                        char* scales_dst, unsigned ns,
                                        unsigned long long timeout_ns) {
#if DEEP_EP_OPS_HAS_BULK_COPY
    wait_loaded(timeout_ns);
    if ((lanes >> lane_id()) & 1u) {
      bulk_store(data_dst, buf, n);
      if (ns > 0) bulk_store(scales_dst, buf + n, ns);
    }
    bulk_commit();
#endif
  }

  // The row went nowhere: only keep the barrier's phase in step.
  __device__ __forceinline__ void skip(unsigned long long timeout_ns) { wait_loaded(timeout_ns); }

  __device__ __forceinline__ void drain() {
#if DEEP_EP_OPS_HAS_BULK_COPY
    bulk_wait_written_all();
#endif
  }
};

}  // namespace dev
}  // namespace deep_ep_ops
