// Dispatch, phase 1 as a kernel of its own: where every (token, topk slot) of this rank lands,
// without atomics whose order matters and without sorting (layout_phases.cuh). One CTA per count
// block, plus one that only announces the entry (with peers); the last count CTA to finish
// publishes the counts, the bases and the per-expert part. With block routing each count CTA
// also writes its tokens' routing rows (block_routing.cuh). The fused compact push
// (dispatch.cu) runs the same count phases inside its own CTAs instead.
#include "block_routing.cuh"
#include "layout_phases.cuh"
#include "../host/cuda_check.hpp"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

constexpr int kLayoutMaxWarps = 8;

// Where the routing rows' warp buffers start in the dynamic shared memory (ints, at 16 bytes):
// after the count's.
__host__ __device__ constexpr size_t routing_bufs_at(int warps, int E, int R) {
  return (count_smem_ints(warps, E, R) + 3) / 4 * 4;
}

template <int KMAX>
__global__ void __launch_bounds__(kLayoutMaxWarps * kWarp) layout_kernel(LayoutParams p) {
  extern __shared__ __align__(16) int smem[];
  __shared__ int is_last;
  __shared__ BlockRoutingSmem routing_smem;
  pdl_wait();
  pdl_trigger();
  // Phase timestamps (ns since the last CTA started) for profiling: recv_info[3..7].
  const unsigned long long t_start = global_ns();
  const uint32_t epoch = layout_epoch(p.comm.epochs);
  const int blocks = count_blocks(p.T, p.cta_tokens);
  const bool peers = p.comm.num_ranks > 1;
  // The extra CTA (R > 1) announces the entry, off every count block's path. It is CTA 0, so it
  // is resident before any count block: under block routing the count blocks wait for every
  // peer's entry, and an entry CTA queued behind count blocks that wait on each other's ranks
  // could otherwise never run when a grid does not fit the SMs at once.
  if (peers && blockIdx.x == 0) {
    // (every earlier kernel of this rank is done: pdl_wait above)
    if (threadIdx.x == 0) announce_entry(p, epoch);
    return;
  }
  const int b = static_cast<int>(blockIdx.x) - (peers ? 1 : 0);  // the count block
  if (b == 0 && threadIdx.x == 0) p.s.kernel_times[kLayoutStart] = t_start;
  const int nw = blockDim.x / kWarp;
  const CountSmem m = carve_count_smem(smem, nw, p.E, p.comm.num_ranks);
  count_block<KMAX>(p, b, nw, m);
  if (peers) announce_block_words(p, b, blocks, epoch);
  // the last CTA to finish goes on (a lone one, T <= cta_tokens: every decode batch, at once);
  // its routing rows come after its counts are out, while the peers' count rows are on their way
  const bool last = counted_last_block(p, blocks, &is_last, peers);
  if (last) publish_counts(p, blocks, epoch, m, t_start);
  if (p.block_routing)
    write_block_routing<KMAX>(p, b, epoch, routing_smem,
                              reinterpret_cast<char*>(smem + routing_bufs_at(nw, p.E, p.comm.num_ranks)));
  if (last) expert_part(p, epoch, m, t_start, p.s.send_handle);
}

size_t layout_smem_bytes(int warps, int E, int R) { return count_smem_ints(warps, E, R) * sizeof(int); }

// With block routing, the count CTA's warp buffers too.
size_t layout_launch_smem_bytes(const LayoutParams& p) {
  if (!p.block_routing) return layout_smem_bytes(p.warps, p.E, p.comm.num_ranks);
  return routing_bufs_at(p.warps, p.E, p.comm.num_ranks) * sizeof(int) +
         block_routing_smem_bytes(p.warps, p.K, p.W);
}

}  // namespace

int layout_warps(int E, int R, size_t smem_limit) {
  int warps = kLayoutMaxWarps;
  while (warps > 1 && layout_smem_bytes(warps, E, R) > smem_limit) --warps;
  return warps;
}

cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream) {
  const size_t smem = layout_launch_smem_bytes(p);
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
