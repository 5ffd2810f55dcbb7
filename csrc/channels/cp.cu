// Context-parallel all-gather / reduce-scatter kernels.
//
// Inline path (small blocks): ONE 1-CTA kernel. Epoch e (device counter) selects buffer parity
// e & 1; each rank stores its block(s) into the peers' inline buffers over NVLink, announces e,
// waits for every peer's e and then reads its own buffer. Parity double buffering makes reuse
// safe without a second barrier: a rank that runs epoch e finished epoch e-1, which waited for
// every peer to enter e-1, so every peer finished reading the parity-(e & 1) buffer of e-2.
//
// Bulk path: the copy engine moves the blocks (channel_ops.cpp); cp_sync_kernel is the 1-CTA
// barrier around the copies and cp_reduce_kernel sums the received blocks in rank order.
#include "../device/accumulate.cuh"
#include "channel_sync.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace deep_ep_ops {
namespace {

using dev::Acc;
using dev::from_acc;
using dev::to_acc;

constexpr int kInlineThreads = 1024;
constexpr int kReduceThreads = 512;

// out[i] = ((b_0[i] + b_1[i]) + b_2[i]) + ... in the accumulation type, rounded once: the CPU
// reference's order (rank 0's block converted, then ranks 1.. added one by one). Rank `self`'s
// block comes from `own`, the others from `slots` (block r at r * block_elems). Plain adds
// (no FMA contraction is possible: there is no multiply), so the result is bitwise the CPU's.
template <typename T>
__device__ __forceinline__ void reduce_blocks(const T* own, const T* slots, T* out, int64_t n,
                                              int self, int R, int64_t i0, int64_t step) {
  using A = typename Acc<T>::type;
  for (int64_t i = i0; i < n; i += step) {
    A acc = to_acc<T>(self == 0 ? own[i] : __ldcg(slots + i));
    for (int r = 1; r < R; ++r) {
      const T v = r == self ? own[i] : __ldcg(slots + static_cast<int64_t>(r) * n + i);
      acc = acc + to_acc<T>(v);
    }
    out[i] = from_acc<T>(acc);
  }
}

// __ldcg has no overloads for the 16-bit float types: load their bits.
__device__ __forceinline__ __nv_bfloat16 ldcg_bits(const __nv_bfloat16* p) {
  const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return __ushort_as_bfloat16(b);
}
__device__ __forceinline__ __half ldcg_bits(const __half* p) {
  const unsigned short b = __ldcg(reinterpret_cast<const unsigned short*>(p));
  return __ushort_as_half(b);
}

template <typename T>
__device__ __forceinline__ void reduce_blocks16(const T* own, const T* slots, T* out, int64_t n,
                                                int self, int R, int64_t i0, int64_t step) {
  for (int64_t i = i0; i < n; i += step) {
    float acc = to_acc<T>(self == 0 ? own[i] : ldcg_bits(slots + i));
    for (int r = 1; r < R; ++r) {
      const T v = r == self ? own[i] : ldcg_bits(slots + static_cast<int64_t>(r) * n + i);
      acc = acc + to_acc<T>(v);
    }
    out[i] = from_acc<T>(acc);
  }
}

// 16-byte words: each thread reduces one word (16 / sizeof(T) elements) of every rank's block,
// in rank order, so the element-wise result is the scalar loop's.
template <typename T>
__device__ __forceinline__ void reduce_words(const char* own, const char* slots, char* out,
                                             int64_t block_bytes, int self, int R, int64_t i0,
                                             int64_t step) {
  constexpr int N = 16 / sizeof(T);
  using A = typename Acc<T>::type;
  const int64_t words = block_bytes / 16;
  const int4* o4 = reinterpret_cast<const int4*>(own);
  for (int64_t w = i0; w < words; w += step) {
    int4 v = self == 0 ? o4[w] : __ldcg(reinterpret_cast<const int4*>(slots) + w);
    A acc[N];
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = to_acc<T>(e[k]);
    for (int r = 1; r < R; ++r) {
      const int4 u = r == self ? o4[w]
                               : __ldcg(reinterpret_cast<const int4*>(slots + r * block_bytes) + w);
      const T* f = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] = acc[k] + to_acc<T>(f[k]);
    }
    int4 res;
    T* g = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = from_acc<T>(acc[k]);
    reinterpret_cast<int4*>(out)[w] = res;
  }
}

template <typename T>
__device__ __forceinline__ void reduce_typed(const char* own, const char* slots, char* out,
                                             int64_t n, int self, int R, int64_t i0,
                                             int64_t step) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  const uint64_t m = reinterpret_cast<uint64_t>(own) | reinterpret_cast<uint64_t>(slots) |
                     reinterpret_cast<uint64_t>(out) | static_cast<uint64_t>(bytes);
  if ((m & 15) == 0) {
    reduce_words<T>(own, slots, out, bytes, self, R, i0, step);
  } else if constexpr (sizeof(T) == 2) {
    reduce_blocks16(reinterpret_cast<const T*>(own), reinterpret_cast<const T*>(slots),
                    reinterpret_cast<T*>(out), n, self, R, i0, step);
  } else {
    reduce_blocks(reinterpret_cast<const T*>(own), reinterpret_cast<const T*>(slots),
                  reinterpret_cast<T*>(out), n, self, R, i0, step);
  }
}

__device__ __forceinline__ void reduce_any(int dtype, const char* own, const char* slots,
                                           char* out, int64_t n, int self, int R, int64_t i0,
                                           int64_t step) {
  switch (dtype) {
    case kF32: reduce_typed<float>(own, slots, out, n, self, R, i0, step); break;
    case kF64: reduce_typed<double>(own, slots, out, n, self, R, i0, step); break;
    case kI32: reduce_typed<int32_t>(own, slots, out, n, self, R, i0, step); break;
    case kI64: reduce_typed<int64_t>(own, slots, out, n, self, R, i0, step); break;
    case kBF16: reduce_typed<__nv_bfloat16>(own, slots, out, n, self, R, i0, step); break;
    case kF16: reduce_typed<__half>(own, slots, out, n, self, R, i0, step); break;
    default: break;
  }
}

__global__ void __launch_bounds__(kInlineThreads, 1) cp_inline_kernel(const __grid_constant__ CpInlineParams p) {
  const ChannelComm& c = p.comm;
  const int R = c.num_ranks, me = c.rank;
  const uint32_t epoch = c.ctr->cp_inline_epoch + 1u;
  // Slots of this call are block_bytes apart (the same on every rank: shapes must match), so
  // the reduction sees the R blocks as one [R, block] array.
  const int64_t par_off =
      p.lay.cp_inline_off + static_cast<int64_t>(epoch & 1u) * R * p.lay.cp_inline_bytes;
  // 1. our block(s) into every peer's buffer [parity][me]
  for (int q = 0; q < R; ++q) {
    if (q == me) continue;
    char* dst = c.peer_base[q] + par_off + static_cast<int64_t>(me) * p.block_bytes;
    const char* src = p.reduce ? p.x + static_cast<int64_t>(q) * p.block_bytes : p.x;
    chan::cta_copy(dst, src, p.block_bytes);
  }
  // All-gather: our own block too, BEFORE announcing. x may be a cp_input view (this rank's
  // bulk cp slot); once every rank saw our announcement, a peer may go on to a bulk
  // reduce-scatter and push into that slot, so x must not be read after the barrier.
  if (!p.reduce)
    chan::cta_copy(p.out + static_cast<int64_t>(me) * p.block_bytes, p.x, p.block_bytes);
  // 2. announce and wait (the helper fences our stores before the flags)
  const bool ok = chan::cta_all_ranks(c, kFlagCpInline, epoch, kOpCpInline);
  // 3. read what the peers stored here
  const char* mine = c.peer_base[me] + par_off;
  if (ok) {
    if (p.reduce) {
      const char* own = p.x + static_cast<int64_t>(me) * p.block_bytes;
      reduce_any(p.dtype, own, mine, p.out, p.block_elems, me, R, threadIdx.x, blockDim.x);
    } else {
      for (int q = 0; q < R; ++q) {
        if (q == me) continue;  // copied before the barrier
        chan::cta_copy(p.out + static_cast<int64_t>(q) * p.block_bytes,
                      mine + static_cast<int64_t>(q) * p.block_bytes, p.block_bytes);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) c.ctr->cp_inline_epoch = epoch;
}

// 1-CTA barrier of the bulk path on flag `kind`. advance: start a new epoch (the "data ready"
// barrier); otherwise reuse the current one (the "reads done" barrier of the same call).
__global__ void cp_sync_kernel(const __grid_constant__ ChannelComm c, int kind, int op, int advance) {
  const uint32_t epoch = c.ctr->cp_epoch + (advance ? 1u : 0u);
  chan::cta_all_ranks(c, kind, epoch, op);
  if (threadIdx.x == 0 && advance) c.ctr->cp_epoch = epoch;
}

__global__ void __launch_bounds__(kReduceThreads) cp_reduce_kernel(const __grid_constant__ CpReduceParams p) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  reduce_any(p.dtype, p.x_block, p.slots, p.out, p.block_elems, p.rank, p.num_ranks, i0, step);
}

}  // namespace

cudaError_t launch_cp_inline(const CpInlineParams& p, cudaStream_t stream) {
  cp_inline_kernel<<<1, kInlineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_cp_sync(const ChannelComm& comm, int flag_kind, int op, bool advance,
                           cudaStream_t stream) {
  cp_sync_kernel<<<1, 32, 0, stream>>>(comm, flag_kind, op, advance ? 1 : 0);
  return cudaGetLastError();
}

cudaError_t launch_cp_reduce(const CpReduceParams& p, int ctas, cudaStream_t stream) {
  cp_reduce_kernel<<<ctas, kReduceThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
