// combine: out[t] = sum over t's destination ranks (ascending) of that rank's partial, where a
// partial is the sum over the group's member rows (ascending) of w[row] * x[row].
//
// push (per-CTA barriers at both ends): each rank reduces its groups locally in fp32 and
// stores the partial into the source rank's window at [source token][combine slot]; the slot
// is the destination's index among the token's destination ranks, so slot order is rank order.
// reduce: each source adds its slots 0..n-1 in order. Every product and sum is rounded to fp32
// on its own (__fmul_rn/__fadd_rn forbid fma contraction) and every sum starts from its first
// term, so results equal the reference bit for bit. When a partial is exactly the row
// (no weights, one member per group) the row travels as is and is widened at the source.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "barrier.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

template <typename T, int V>
struct alignas(sizeof(T) * V >= 16 ? 16 : sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_from_f32(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <typename T, int V>
__global__ void __launch_bounds__(512) combine_push_kernel(CombineParams p) {
  pdl_wait();
  pdl_trigger();
  cta_barrier(p.comm, blockIdx.x, kOpCombinePush);
  const int W = p.W, K = p.K;
  const int G = p.handle[handle::kHdrValidGroups];
  const bool expand = p.handle[handle::kHdrExpand] != 0;
  // Rows travel as is when the partial is exactly the row: no weights and one member per
  // group (compact layout). The handle header says which layout made it.
  const bool raw = p.stage_raw && !expand;
  const int64_t slot_bytes = static_cast<int64_t>(p.Wd) * (raw ? sizeof(T) : sizeof(float));
  const int* recv = p.handle + static_cast<int64_t>(handle::kHeaderRows + p.T) * W;
  const T* x = static_cast<const T*>(p.x);
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  for (int g = blockIdx.x * warps + warp_id(); g < G; g += gridDim.x * warps) {
    const int* hrow = recv + static_cast<int64_t>(g) * W;
    const int src = hrow[handle::kGroupSrcRank], tok = hrow[handle::kGroupSrcToken],
              cslot = hrow[handle::kGroupCombineSlot];
    char* dst = p.comm.peer_base[src] + p.stage_off +
                (static_cast<int64_t>(tok) * p.num_slots + cslot) * slot_bytes;
    if (raw) {  // compact, no weights: the partial is the row itself
      warp_copy(dst, x + static_cast<int64_t>(hrow[handle::kGroupMember]) * p.Wd, slot_bytes);
      continue;
    }
    int nm = 1;
    int members[kMaxTopk];
    members[0] = hrow[handle::kGroupMember];
    if (expand) {
      for (int m = 1; m < K; ++m) {
        const int r = hrow[handle::kGroupMember + m];
        if (r < 0) break;
        members[nm++] = r;
      }
    }
    float* out = reinterpret_cast<float*>(dst);
    for (int c = lane * V; c < p.Wd; c += kWarp * V) {
      float acc[V];
      load_f32<T, V>(x + static_cast<int64_t>(members[0]) * p.Wd + c, acc);
      if (p.weights != nullptr) {
        const float w0 = p.weights[members[0]];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = __fmul_rn(w0, acc[i]);
      }
      for (int m = 1; m < nm; ++m) {
        float v[V];
        load_f32<T, V>(x + static_cast<int64_t>(members[m]) * p.Wd + c, v);
        const float wm = p.weights != nullptr ? p.weights[members[m]] : 1.f;
#pragma unroll
        for (int i = 0; i < V; ++i)
          acc[i] = __fadd_rn(acc[i], p.weights != nullptr ? __fmul_rn(wm, v[i]) : v[i]);
      }
      store_from_f32<float, V>(out + c, acc);
    }
  }
  cta_barrier(p.comm, blockIdx.x, kOpCombinePush);
}

template <typename T, typename S, int V>
__device__ __forceinline__ void combine_reduce(const CombineParams& p) {
  const char* win = p.comm.peer_base[p.comm.rank] + p.stage_off;
  T* out = static_cast<T*>(p.out);
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  const int64_t slot_elems = p.Wd;
  for (int t = blockIdx.x * warps + warp_id(); t < p.T; t += gridDim.x * warps) {
    const int n = p.handle[static_cast<int64_t>(handle::kHeaderRows + t) * p.W + handle::kSendNumDst];
    const S* slot0 = reinterpret_cast<const S*>(win) + static_cast<int64_t>(t) * p.num_slots * slot_elems;
    for (int c = lane * V; c < p.Wd; c += kWarp * V) {
      float acc[V];
      if (n == 0) {
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.f;
      } else {
        load_f32<S, V>(slot0 + c, acc);
        for (int s = 1; s < n; ++s) {
          float v[V];
          load_f32<S, V>(slot0 + s * slot_elems + c, v);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] = __fadd_rn(acc[i], v[i]);
        }
      }
      store_from_f32<T, V>(out + static_cast<int64_t>(t) * p.Wd + c, acc);
    }
  }
}

// S: staged element type (float, or T when rows travel as is).
template <typename T, int V>
__global__ void __launch_bounds__(512) combine_reduce_kernel(CombineParams p) {
  pdl_wait();
  pdl_trigger();
  if (p.stage_raw && p.handle[handle::kHdrExpand] == 0)
    combine_reduce<T, T, V>(p);
  else
    combine_reduce<T, float, V>(p);
}

template <typename T, int V>
cudaError_t launch_typed(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  cudaError_t err = launch_pdl(combine_push_kernel<T, V>, ctas, 512, 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch_pdl(combine_reduce_kernel<T, V>, epi_ctas, 512, 0, stream, p);
}

template <typename T>
cudaError_t launch_width(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  // Vector width: 16-byte accesses where the row width allows (rows start at multiples of
  // Wd elements, so Wd % V == 0 keeps every access aligned).
  constexpr int kWide = 16 / sizeof(T);
  if (p.Wd % kWide == 0) return launch_typed<T, kWide>(p, ctas, epi_ctas, stream);
  if (p.Wd % 2 == 0) return launch_typed<T, 2>(p, ctas, epi_ctas, stream);
  return launch_typed<T, 1>(p, ctas, epi_ctas, stream);
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  switch (p.dtype) {
    case 0: return launch_width<float>(p, ctas, epi_ctas, stream);
    case 1: return launch_width<__nv_bfloat16>(p, ctas, epi_ctas, stream);
    case 2: return launch_width<__half>(p, ctas, epi_ctas, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace deep_ep_ops
