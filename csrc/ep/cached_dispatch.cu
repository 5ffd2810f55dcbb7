// cached_dispatch: the routing is known from the handle, so no counts are exchanged.
//
// The handle's send part names expert-major rows (not the compact group a token becomes at the
// destination), so the receiver pulls instead of the sender pushing: every rank stages its rows
// in its own window (stage kernel, behind a barrier that frees the window), then after a second
// barrier each receiver reads every group's source row once over NVLink and writes it to all of
// the group's output rows, zeroing rows that carry no token. The next op's opening barrier
// keeps peers from overwriting a staging area that is still being read. Groups of this rank's
// own tokens read x itself; with one rank nothing is staged and there is no barrier: cached
// dispatch is the pull kernel alone.
#include "ep_barrier.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

__global__ void __launch_bounds__(512) cached_stage_kernel(CachedParams p) {
  pdl_wait();
  pdl_trigger();
  cta_barrier(p.comm, blockIdx.x, kOpCachedStage);
  char* win = peer_ptr(p.comm, p.comm.rank);
  const int warps = blockDim.x / kWarp;
  for (int t = blockIdx.x * warps + warp_id(); t < p.T; t += gridDim.x * warps) {
    warp_copy(win + p.x_off + static_cast<int64_t>(t) * p.x_stride,
              p.x + static_cast<int64_t>(t) * p.x_bytes, p.x_bytes);
    if (p.s_bytes > 0)
      warp_copy(win + p.s_off + static_cast<int64_t>(t) * p.s_stride,
                p.scales + static_cast<int64_t>(t) * p.s_bytes, p.s_bytes);
  }
}

__global__ void __launch_bounds__(512) cached_pull_kernel(CachedParams p) {
  pdl_wait();
  pdl_trigger();
  // Arriving here certifies this rank's whole stage kernel (it ran before this kernel).
  cta_barrier(p.comm, blockIdx.x, kOpCachedPull);
  const int me = p.comm.rank;
  const int W = p.W, K = p.K;
  const int G = p.handle[handle::kHdrValidGroups];
  const bool expand = p.handle[handle::kHdrExpand] != 0;  // the layout the handle was made with
  const int* recv = handle_row(p.handle, p.T, W);
  const int lane = lane_id();
  const int warps = blockDim.x / kWarp;
  for (int i = blockIdx.x * warps + warp_id(); i < p.C; i += gridDim.x * warps) {
    const int* hrow = recv + static_cast<int64_t>(i) * W;
    if (i < G) {
      const int src = hrow[handle::kGroupSrcRank], tok = hrow[handle::kGroupSrcToken];
      const char* sx;
      const char* ss;
      if (src == me) {  // this rank's own token: straight from x
        sx = p.x + static_cast<int64_t>(tok) * p.x_bytes;
        ss = p.scales + static_cast<int64_t>(tok) * p.s_bytes;
      } else {
        const char* base = peer_ptr(p.comm, src);
        sx = base + p.x_off + static_cast<int64_t>(tok) * p.x_stride;
        ss = base + p.s_off + static_cast<int64_t>(tok) * p.s_stride;
      }
      if (!expand) {
        warp_copy(p.out_x + static_cast<int64_t>(i) * p.x_bytes, sx, p.x_bytes);
        if (p.s_bytes > 0) warp_copy(p.out_s + static_cast<int64_t>(i) * p.s_bytes, ss, p.s_bytes);
      } else {
        // members (-1 padded) in lanes: the source row is read once for all of them
        const int r = lane < K ? hrow[handle::kGroupMember + lane] : -1;
        const unsigned members = __ballot_sync(0xffffffffu, r >= 0);
        warp_copy_rows(p.out_x, r, members, sx, p.x_bytes);
        if (p.s_bytes > 0) warp_copy_rows(p.out_s, r, members, ss, p.s_bytes);
      }
    }
    if (hrow[handle::kRecvSrcRank] < 0) {
      warp_zero(p.out_x + static_cast<int64_t>(i) * p.x_bytes, p.x_bytes);
      if (p.s_bytes > 0) warp_zero(p.out_s + static_cast<int64_t>(i) * p.s_bytes, p.s_bytes);
    }
  }
}

}  // namespace

cudaError_t launch_cached_dispatch(const CachedParams& p, int ctas, int epi_ctas,
                                   cudaStream_t stream) {
  // one rank: nothing to stage, no barrier, any grid
  if (p.comm.num_ranks == 1) return launch_pdl(cached_pull_kernel, epi_ctas, 512, 0, stream, p);
  cudaError_t err = launch_pdl(cached_stage_kernel, ctas, 512, 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch_pdl(cached_pull_kernel, ctas, 512, 0, stream, p);
}

}  // namespace deep_ep_ops
