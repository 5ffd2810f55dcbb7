// Device-side building blocks shared by every kernel family: memory-ordering primitives, PDL,
// peer addresses and warp-wide row copies.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <utility>
#include <cuda_runtime.h>

#include "shared_types.hpp"

namespace deep_ep_ops {
namespace dev {

constexpr int kWarp = 32;

__device__ __forceinline__ int lane_id() { return threadIdx.x & (kWarp - 1); }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarp; }
__device__ __forceinline__ uint32_t lanemask_lt() { return (1u << lane_id()) - 1u; }

// System-scope acquire/release: the peer that wrote a flag over NVLink must have all its
// preceding stores visible to us once we observe the flag, and vice versa.
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// One thread raises n flags (flag_of(i), i < n) to `value` once everything it has seen is
// visible at system scope: its own stores and, after a CTA sync, its CTA's (the fence is
// cumulative). One fence, then plain strong stores: st.release per flag would fence before
// each flag, and each of those fences waits for the previous flag's store to land.
template <typename FlagOf>
__device__ __forceinline__ void release_flags_sys(int n, FlagOf flag_of, uint32_t value) {
  __threadfence_system();
  for (int i = 0; i < n; ++i) st_relaxed_sys(flag_of(i), value);
}
__device__ __forceinline__ void release_flag_sys(uint32_t* flag, uint32_t value) {
  release_flags_sys(1, [flag](int) { return flag; }, value);
}
// GPU-scope release: a flag only this GPU's threads read (no system-scope fence).
__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// One 8-byte word that is its own flag (data in one half, an epoch in the other): a single
// store, so a reader sees both halves of it or neither; no ordering with other stores needed.
__device__ __forceinline__ void st_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// Nanoseconds of the GPU's global timer (phase timestamps for profiling).
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// Loads of data peers wrote earlier in this kernel: skip L1, which is not coherent with them.
__device__ __forceinline__ int ld_cg(const int* p) { return __ldcg(p); }

// ---- programmatic dependent launch (PDL, sm_90+) ----------------------------------------------
// Kernels launched with launch_pdl() may be scheduled while the previous kernel of the stream
// is still running; pdl_wait() blocks until that kernel has completed and its memory is
// visible, so every kernel calls it before its first global memory access or barrier (a peer
// CTA therefore still never arrives before the peer's earlier kernels finished). pdl_trigger()
// lets the next kernel be scheduled early; it only takes effect once every CTA of this grid
// has called it or exited, so this grid is fully resident before the next one takes SMs.
// Both are no-ops for a kernel launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 to fetch [p, p + bytes) (a hint; sm_90 bulk prefetch, skipped unless 16-byte aligned
// and sized). Lets a kernel stream inputs that an EARLIER kernel than its PDL predecessor
// wrote before its pdl_wait(): see dispatch_push_kernel.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (bytes > 0 && bytes < (1LL << 31) &&
      ((reinterpret_cast<uintptr_t>(p) | static_cast<uintptr_t>(bytes)) & 15) == 0)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p),
                 "r"(static_cast<uint32_t>(bytes))
                 : "memory");
#endif
}

// 16 bytes from global (a peer's memory too) into shared memory without holding registers while
// they fly (sm_80+); cp_async_wait_all() waits for every such copy of the calling thread.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
// The same with an L2 cache policy (l2_evict_first_policy) attached to the read.
__device__ __forceinline__ void cp_async_16_hinted(void* smem, const void* gmem, unsigned long long policy) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem),
               "l"(policy)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
}

// ---- L2 eviction hints (sm_80+) ------------------------------------------------------------
// A policy under which the lines an access brings into L2 are the first to be evicted: for
// bytes streamed once (a dispatch's rows), so that tens of MB passing through L2 do not push out
// what the next kernels of the call read again (routing, flags, metadata).
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
// A 16-byte store under such a policy, not kept in L1 either.
__device__ __forceinline__ void st_16_hinted(void* gmem, int4 v, unsigned long long policy) {
  asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.s32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(gmem),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "l"(policy)
               : "memory");
}

// c.peer_base[i] for a runtime i without indexing a kernel parameter array dynamically (that
// makes the compiler copy the whole parameter struct to every thread's local memory).
template <typename View>
__device__ __forceinline__ char* peer_ptr(const View& c, int i) {
  char* r = c.peer_base[0];
#pragma unroll
  for (int j = 1; j < kMaxRanks; ++j)
    if (i == j) r = c.peer_base[j];
  return r;
}

// ---- warp-wide copies of one row -------------------------------------------------------------
// Rows are byte strings (any dtype travels as bytes). The widest access both pointers and the
// length allow is used; the choice is warp-uniform, so there is no divergence inside a row.
__device__ __forceinline__ int copy_width(const void* a, const void* b, int64_t n) {
  uint64_t m = reinterpret_cast<uint64_t>(a) | reinterpret_cast<uint64_t>(b) |
               static_cast<uint64_t>(n);
  if ((m & 15) == 0) return 16;
  if ((m & 7) == 0) return 8;
  if ((m & 3) == 0) return 4;
  if ((m & 1) == 0) return 2;
  return 1;
}

template <typename V>
__device__ __forceinline__ void warp_copy_v(char* dst, const char* src, int64_t n) {
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  const int64_t count = n / static_cast<int64_t>(sizeof(V));
  // Up to kUnroll loads per lane in flight before the first store, the tail predicated (not
  // one access at a time): a 7 KiB row of 16-byte accesses is 2 rounds instead of 5.
  constexpr int kUnroll = 8;
  for (int64_t base = lane_id(); base < count; base += kUnroll * kWarp) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kWarp < count) v[u] = s[base + u * kWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kWarp < count) d[base + u * kWarp] = v[u];
  }
}

__device__ __forceinline__ void warp_copy(void* dst, const void* src, int64_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  switch (copy_width(d, s, n)) {
    case 16: warp_copy_v<int4>(d, s, n); break;
    case 8: warp_copy_v<int2>(d, s, n); break;
    case 4: warp_copy_v<int>(d, s, n); break;
    case 2: warp_copy_v<short>(d, s, n); break;
    default: warp_copy_v<char>(d, s, n); break;
  }
}

// Copies one row to several destinations, those of the lanes set in `lanes` (warp-uniform);
// dest_of(k) gives lane k's (a shuffle from lane k: every lane calls it). Each round of loads
// is stored to every destination before the next round, so the source is read once however
// many receive it. Must be called by the whole warp: the destinations travel by shuffles over
// all 32 lanes, so every lane runs the same number of rounds (a row shorter than a round, e.g.
// 128 bytes of scales = 8 int4, leaves lanes with nothing to copy; they stay in the loop with
// their accesses predicated off rather than leaving it, which would make the shuffles diverge:
// undefined behaviour that scrambles rows and everything shuffled after it).
template <typename V, typename DestOf>
__device__ __forceinline__ void warp_copy_to_v(unsigned lanes, const char* src, int64_t n,
                                               DestOf dest_of) {
  const V* s = reinterpret_cast<const V*>(src);
  const int64_t count = n / static_cast<int64_t>(sizeof(V));
  constexpr int kUnroll = 8;
  for (int64_t round = 0; round < count; round += kUnroll * kWarp) {  // warp-uniform trip count
    const int64_t base = round + lane_id();
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kWarp < count) v[u] = s[base + u * kWarp];
    for (unsigned m = lanes; m != 0; m &= m - 1) {
      V* d = reinterpret_cast<V*>(dest_of(__ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kWarp < count) d[base + u * kWarp] = v[u];
    }
  }
}

// warp_copy_to_v with the access width (bytes, warp-uniform) chosen at run time.
template <typename DestOf>
__device__ __forceinline__ void warp_copy_to(int width, unsigned lanes, const char* src,
                                             int64_t n, DestOf dest_of) {
  switch (width) {
    case 16: warp_copy_to_v<int4>(lanes, src, n, dest_of); break;
    case 8: warp_copy_to_v<int2>(lanes, src, n, dest_of); break;
    case 4: warp_copy_to_v<int>(lanes, src, n, dest_of); break;
    case 2: warp_copy_to_v<short>(lanes, src, n, dest_of); break;
    default: warp_copy_to_v<char>(lanes, src, n, dest_of); break;
  }
}

// One row to the destinations of the lanes set in `lanes`, each lane holding its own in `dst`.
__device__ __forceinline__ void warp_copy_fanout(char* dst, unsigned lanes, const char* src,
                                                 int64_t n) {
  // the narrowest access any destination allows
  const int mine = (lanes >> lane_id()) & 1u ? copy_width(dst, src, n) : 16;
  const int width = static_cast<int>(__reduce_min_sync(0xffffffffu, static_cast<unsigned>(mine)));
  warp_copy_to(width, lanes, src, n, [dst](int k) {
    return reinterpret_cast<char*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(dst), k));
  });
}

// One row to the rows dst_base + row_k * n of the lanes k set in `lanes` (each lane holds its
// row in `row`): only the 32-bit rows travel, and every such row is aligned like dst_base and n.
__device__ __forceinline__ void warp_copy_rows(char* dst_base, int row, unsigned lanes,
                                               const char* src, int64_t n) {
  warp_copy_to(copy_width(dst_base, src, n), lanes, src, n, [=](int k) {
    return dst_base + static_cast<int64_t>(__shfl_sync(0xffffffffu, row, k)) * n;
  });
}

template <typename V>
__device__ __forceinline__ void warp_zero_v(char* dst, int64_t n) {
  V* d = reinterpret_cast<V*>(dst);
  V z;
  memset(&z, 0, sizeof(V));
  for (int64_t i = lane_id(); i < n / static_cast<int64_t>(sizeof(V)); i += kWarp) d[i] = z;
}

__device__ __forceinline__ void warp_zero(void* dst, int64_t n) {
  char* d = static_cast<char*>(dst);
  switch (copy_width(d, d, n)) {
    case 16: warp_zero_v<int4>(d, n); break;
    case 8: warp_zero_v<int2>(d, n); break;
    case 4: warp_zero_v<int>(d, n); break;
    case 2: warp_zero_v<short>(d, n); break;
    default: warp_zero_v<char>(d, n); break;
  }
}

// Warp-wide fill of n int32 values.
__device__ __forceinline__ void warp_fill_i32(int* dst, int n, int v) {
  for (int i = lane_id(); i < n; i += kWarp) dst[i] = v;
}

// The next work item of a warp that takes items by ticket after a fixed first round of
// `first_round` items (one per warp): a CTA that starts late (its SM held by another process's
// kernel) then finds its share done by the others instead of ending the kernel late. The
// counter starts at 0 each launch (whoever launches before resets it).
__device__ __forceinline__ int warp_next_ticket(unsigned* counter, int first_round) {
  unsigned ticket = 0;
  if (lane_id() == 0) ticket = atomicAdd(counter, 1u);
  return first_round + static_cast<int>(__shfl_sync(0xffffffffu, ticket, 0));
}

__device__ __forceinline__ int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

}  // namespace dev

// DEEP_EP_OPS_PDL=0 turns programmatic dependent launch off (read once per process).
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DEEP_EP_OPS_PDL");
    return !(v != nullptr && v[0] == '0');
  }();
  return on;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialization (when enabled): the kernel must start with dev::pdl_wait().
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace deep_ep_ops
