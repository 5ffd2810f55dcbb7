// Dispatch, phase 1 as a kernel of its own: where every (token, topk slot) of this rank lands,
// without atomics whose order matters and without sorting (layout_phases.cuh). One CTA per count
// block, plus one that only announces the entry (with peers); the last count CTA to finish
// publishes the counts, the bases and the per-expert part. The fused compact push (dispatch.cu)
// runs the same phases inside its own CTAs instead.
#include "layout_phases.cuh"
#include "../host/cuda_check.hpp"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

constexpr int kLayoutMaxWarps = 8;

template <int KMAX>
__global__ void __launch_bounds__(kLayoutMaxWarps * kWarp) layout_kernel(LayoutParams p) {
  extern __shared__ int smem[];
  __shared__ int is_last;
  pdl_wait();
  pdl_trigger();
  // Phase timestamps (ns since the last CTA started) for profiling: recv_info[3..7].
  const unsigned long long t_start = global_ns();
  const uint32_t epoch = layout_epoch(p.comm.epochs);
  const int blocks = count_blocks(p.T, p.cta_tokens);
  if (blockIdx.x == blocks) {  // the extra CTA (R > 1): the entry, off every count block's path
    // (every earlier kernel of this rank is done: pdl_wait above)
    if (threadIdx.x == 0) announce_entry(p, epoch);
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) p.s.kernel_times[kLayoutStart] = t_start;
  const int nw = blockDim.x / kWarp;
  const CountSmem m = carve_count_smem(smem, nw, p.E, p.comm.num_ranks);
  count_block<KMAX>(p, blockIdx.x, nw, m);
  const bool peers = p.comm.num_ranks > 1;
  if (peers) announce_block_words(p, blockIdx.x, blocks, epoch);
  // the last CTA to finish goes on (a lone one, T <= cta_tokens: every decode batch, at once)
  if (!counted_last_block(p, blocks, &is_last, peers)) return;
  publish_counts(p, blocks, epoch, m, t_start);
  expert_part(p, epoch, m, t_start, p.s.send_handle);
}

size_t layout_smem_bytes(int warps, int E, int R) { return count_smem_ints(warps, E, R) * sizeof(int); }

}  // namespace

int layout_warps(int E, int R, size_t smem_limit) {
  int warps = kLayoutMaxWarps;
  while (warps > 1 && layout_smem_bytes(warps, E, R) > smem_limit) --warps;
  return warps;
}

cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream) {
  const size_t smem = layout_smem_bytes(p.warps, p.E, p.comm.num_ranks);
  const bool small = p.K <= 8;
  static const int room_small = raise_dynamic_smem_limit(reinterpret_cast<const void*>(layout_kernel<8>));
  static const int room_large =
      raise_dynamic_smem_limit(reinterpret_cast<const void*>(layout_kernel<kMaxTopk>));
  if (smem > static_cast<size_t>(small ? room_small : room_large)) return cudaErrorInvalidValue;
  // one CTA per count block, and one for the entry when there are peers
  const int ctas = count_blocks(p.T, p.cta_tokens) + (p.comm.num_ranks > 1 ? 1 : 0);
  return launch_pdl(small ? layout_kernel<8> : layout_kernel<kMaxTopk>, ctas,
                    p.warps * dev::kWarp, smem, stream, p);
}

}  // namespace deep_ep_ops
