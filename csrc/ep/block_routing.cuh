// The count blocks' routing rows (LayoutParams::block_routing): once its compact bases are
// known, each count CTA of the layout kernel writes (one lane per token, rows staged per warp
// and stored whole) the rows the pipelined push would otherwise write per token beside its data
// rows: the token's handle send row, and at each of its destination ranks its compact routing
// rows (recv_topk_idx, recv_topk_weights and the handle's receive row), into this rank's
// outputs or into the destination's direct-output slot when its routing outputs sit there
// (SlotRouting). The push then moves only x and the scales (and the metadata rows of
// destinations without such a slot).
//
// Why here: each of those small stores cost the push's row loop about as much as a row store
// (bench/NOTES.md v20: without them a lone call at 24 SMs ended ~5 us sooner), while the count
// CTAs run on SMs of their own beside the push and are idle once they have counted. Their
// bases come from the same block words the push's base table is built from
// (announce_block_words), so both agree on every row.
#pragma once

#include "layout_phases.cuh"

namespace deep_ep_ops {
namespace dev {

// What a count CTA keeps in shared memory while it waits for its bases.
struct BlockRoutingSmem {
  int base[kMaxRanks];        // compact row of the block's first token sent to each rank
  int lower_blocks[kMaxRanks];  // count blocks of each lower rank
  long long routing_at[kMaxRanks];  // each peer's routing offset in its slot (SlotRouting), or -1
  int ok;
};

// Block b's compact bases at every destination d: the lower ranks' tokens to d (every block of
// theirs) plus this rank's blocks before b, from the block words in this rank's window; and,
// once each peer's entry is in, where it wants its routing rows. Every thread of the CTA;
// false after a failed wait (the push then fails its own waits and its barrier reports).
__device__ inline bool wait_block_bases(const LayoutParams& p, int b, uint32_t epoch,
                                        BlockRoutingSmem& sm) {
  const Comm& c = p.comm;
  const int R = c.num_ranks, me = c.rank;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    sm.base[d] = 0;
    sm.routing_at[d] = -1;
  }
  if (threadIdx.x == 0) sm.ok = 1;
  __syncthreads();
  // round 1: each lower rank's block 0 word to each d (it carries that rank's block count), and
  // each peer's entry
  for (int i = threadIdx.x; i < me * R + R; i += blockDim.x) {
    if (i < me * R) {
      const int s = i / R, d = i % R;
      const long long v = wait_epoch_word(block_word(c, me, s, 0, d), epoch, c.wait,
                                          kOpDispatchLayout, kLayoutSlot, s);
      if (v < 0) {
        sm.ok = 0;
        continue;
      }
      atomicAdd(&sm.base[d], block_word_tokens(v));  // integer sums: any order
      if (d == 0) sm.lower_blocks[s] = block_word_blocks(v);
    } else if (const int peer = i - me * R; peer != me) {
      if (!wait_epoch(flag_ptr(peer_ptr(c, me), c, kEnterSlot, peer), epoch, c.wait,
                      kOpDispatchLayout, kEnterSlot, peer))
        sm.ok = 0;
    }
  }
  __syncthreads();
  if (!sm.ok) return false;
  // round 2: the lower ranks' other blocks, then this rank's blocks before b
  int rest = b * R;
  for (int s = 0; s < me; ++s) rest += (sm.lower_blocks[s] - 1) * R;
  for (int j = threadIdx.x; j < rest; j += blockDim.x) {
    int s = 0, k = j;
    while (s < me && k >= (sm.lower_blocks[s] - 1) * R) k -= (sm.lower_blocks[s++] - 1) * R;
    const int bb = k / R + (s < me ? 1 : 0), d = k % R;
    const long long v = wait_epoch_word(block_word(c, me, s, bb, d), epoch, c.wait,
                                        kOpDispatchLayout, kLayoutSlot, s);
    if (v < 0) {
      sm.ok = 0;
      break;
    }
    atomicAdd(&sm.base[d], block_word_tokens(v));
  }
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (d != me)
      sm.routing_at[d] = __ldcg(reinterpret_cast<const long long*>(peer_ptr(c, me) + c.outs_off) +
                                kOutsPerRank * d + 2);
  __syncthreads();
  return sm.ok != 0;
}

// Shared memory a count CTA of nw warps needs for its routing rows beside the count's: one
// staging buffer per warp for 32 rows of the widest kind (handle rows of W ints, or K int64).
__host__ __device__ constexpr size_t block_routing_smem_bytes(int nw, int K, int W) {
  return static_cast<size_t>(nw) * kWarp * (W * 4 > K * 8 ? W * 4 : K * 8);
}

// The warp's n staged rows (consecutive rows of one destination, or the warp's consecutive
// tokens) from its buffer to dst, whole lines at a time: 16-byte pieces where both sides allow,
// else 4-byte words. The whole warp calls it; the buffer is free again when it returns.
__device__ __forceinline__ void warp_store_staged(void* dst, const void* buf, int64_t bytes) {
  __syncwarp();
  const int lane = lane_id();
  if (((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) & 15u) == 0) {
    int4* d = static_cast<int4*>(dst);
    const int4* b = static_cast<const int4*>(buf);
    for (int64_t i = lane; i < bytes / 16; i += kWarp) d[i] = b[i];
  } else {
    int* d = static_cast<int*>(dst);
    const int* b = static_cast<const int*>(buf);
    for (int64_t i = lane; i < bytes / 4; i += kWarp) d[i] = b[i];
  }
  __syncwarp();
}

// After count_block and announce_block_words: block b's routing rows (see the top). Every
// thread of the CTA; warp w takes the block's tokens w * 32 + lane (the lanes that counted
// them, so their tok_rank stores are their own). Rows are built in the warp's buffer and
// stored whole (a warp's tokens are consecutive, and so are its tokens' rows at each
// destination: the block's prefix plus the warp's), so the stores fill whole lines; one thread
// writing its token's scattered rows took ~20-40 us at R = 2 (bench/NOTES.md v20).
template <int KMAX>
__device__ void write_block_routing(const LayoutParams& p, int b, uint32_t epoch,
                                    BlockRoutingSmem& sm, char* warp_bufs) {
  const bool ok = wait_block_bases(p, b, epoch, sm);
  const int w = warp_id(), lane = lane_id();
  const int t0 = b * p.cta_tokens + w * kWarp;
  if (ok && t0 < p.T) {
    const int K = p.K, W = p.W, me = p.comm.rank, t = t0 + lane;
    const bool valid = t < p.T;
    char* buf = warp_bufs + static_cast<size_t>(w) * block_routing_smem_bytes(1, K, W);
    int* ibuf = reinterpret_cast<int*>(buf);
    int e[KMAX], dst[KMAX], row[KMAX];
    float wgt[KMAX];
    unsigned dmask = 0;
    // every slot's loads in flight at once, as in count_block; a slot without an expert loads a
    // rank the count did not write, unused
    int rank[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      const int64_t tk = static_cast<int64_t>(t) * K + k;
      const bool slot = valid && k < K;
      e[k] = slot ? load_expert(p.topk_idx, p.idx64, tk) : -1;
      rank[k] = slot ? p.s.tok_rank[tk] : 0;
      wgt[k] = slot ? p.topk_w[tk] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      dst[k] = e[k] >= 0 ? e[k] / p.E_loc : -1;
      row[k] = e[k] >= 0 ? sm.base[dst[k]] + tok_rank_in_block(rank[k]) : -1;
      if (e[k] < 0) wgt[k] = 0.f;
      if (e[k] >= 0) dmask |= 1u << dst[k];
    }
    const int n_tok = min(kWarp, p.T - t0);
    if (valid) thread_write_send_row(ibuf + lane * W, W, K, __popc(dmask), dst, row);
    warp_store_staged(handle_row(p.handle, t0, W), buf,
                      static_cast<int64_t>(n_tok) * W * 4);
    for (int d = 0; d < p.comm.num_ranks; ++d) {
      const unsigned at_d = __ballot_sync(0xffffffffu, (dmask >> d) & 1u);
      if (at_d == 0) continue;
      RoutingRows to;
      if (d == me) {
        to = {p.recv_idx, p.recv_w, handle_row(p.handle, p.T, W)};
      } else if (sm.routing_at[d] >= 0) {
        char* base = peer_ptr(p.comm, d);
        to = SlotRouting::at(sm.routing_at[d], p.C, K, W).rows_in(base);
      } else {
        continue;  // d's metadata rows: the push writes them
      }
      // this lane's row at d is the i-th of the warp's n there, which start at row r0
      const bool here = (at_d >> lane) & 1u;
      const int i = __popc(at_d & lanemask_lt()), n = __popc(at_d);
      int r = -1;
#pragma unroll
      for (int k = 0; k < KMAX; ++k)
        if (dst[k] == d) r = row[k];
      const int r0 = __shfl_sync(0xffffffffu, r, __ffs(at_d) - 1);
      if (here) {
        int64_t* irow = reinterpret_cast<int64_t*>(buf) + static_cast<int64_t>(i) * K;
#pragma unroll
        for (int k = 0; k < KMAX; ++k)
          if (k < K) irow[k] = dst[k] == d ? e[k] - d * p.E_loc : -1;
      }
      warp_store_staged(to.idx + static_cast<int64_t>(r0) * K, buf, static_cast<int64_t>(n) * K * 8);
      if (here) {
        float* wrow = reinterpret_cast<float*>(buf) + static_cast<int64_t>(i) * K;
#pragma unroll
        for (int k = 0; k < KMAX; ++k)
          if (k < K) wrow[k] = dst[k] == d ? wgt[k] : 0.f;
      }
      warp_store_staged(to.w + static_cast<int64_t>(r0) * K, buf, static_cast<int64_t>(n) * K * 4);
      if (here)
        thread_write_compact_recv_row(ibuf + i * W, W, me, t, r, __popc(dmask & ((1u << d) - 1u)));
      warp_store_staged(to.recv_h + static_cast<int64_t>(r0) * W, buf, static_cast<int64_t>(n) * W * 4);
    }
  }
  // The peers read these rows once this rank's push has passed its barrier, which it reaches
  // only after this kernel has ended (its PDL wait); the system fence makes the CTA's stores
  // visible beyond this GPU before that (one thread after the CTA's sync: cumulative).
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
}

}  // namespace dev
}  // namespace deep_ep_ops
