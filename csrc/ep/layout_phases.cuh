// The phases of dispatch's count and count exchange, as device functions: the layout kernel
// (layout.cu: many count CTAs, the last one publishes) and the fused compact push
// (dispatch.cu: its CTAs count blocks by ticket, the one that counts the last block publishes,
// then every CTA pushes rows) run the same code, so the rows come out the same either way.
//
// Block b counts tokens [b*cta_tokens, (b+1)*cta_tokens), one warp per 32 tokens (lane =
// token). For each expert, the lanes holding it OR their bit into a warp-private mask word, so
// a token's rank among the warp's tokens of that expert is the popcount of the lower lanes;
// ballots do the same per destination rank. A scan over the block's warps turns these into
// ranks among the block's tokens (tok_rank) and gives the block's histogram (cta_prefix[b]).
// The CTA that counts the last block (atomic ticket; integer sums, so which one it is does not
// matter) scans the histograms over blocks in block order (exclusive per-block prefixes, in
// place). The bases at every destination follow from the count matrix:
//   compact row at d       = cbase[d] + prefix(block of t)[E + d] + rank of t in its block to d
//   cbase[d]               = sum_{s<me} tokens(s->d)
//   expert-major row at d  = ebase[e] + prefix(block of t)[e] + rank of t in its block for e
//   ebase[e]               = aligned block start of e + sum_{s<me} count(s,e)
// The compact bases need only the lower ranks' token counts and this rank's block prefixes.
// Each count block announces its tokens to each rank as one 8-byte word (epoch, the rank's
// block count, the count) in this rank's window and every higher rank's (announce_block_words),
// and the pipelined push builds its bases from those words as they come (dispatch.cu
// wait_block_words), with no publisher on its path. For the other pushes, right after its scan
// the publisher stores its R token counts into every higher rank's window, each as one 8-byte word
// with the call's epoch in its other half (the word is its own flag: no fence, no relay), and
// raises a local flag; a compact push starts once that flag and the lower ranks' words are in
// and sums cbase itself. So rank 0's rows start moving without waiting for anyone's count, and
// rank s's after one store from each lower rank. The publisher then sends its whole count row
// [E per-expert counts, R per-rank token counts] to every peer and, once every peer's row is
// in, does the per-expert part (ebase, tokens per expert). The push adds the three terms per
// (token, slot), so the rows are the same pure function of the routing as in a one-pass
// serial count: (source rank, source token) order.
// Entry: one thread (the layout kernel's extra CTA, so no count block waits behind its system
// fence; CTA 0 of the fused push) tells every peer at once where this rank's recv_x /
// recv_scales live (a direct-output slot of its window, where the peers' pushes then write rows
// straight, or -1) and announces that it entered the call; a peer's push writes into this
// rank's window only after seeing that.
#pragma once

#include "ep_barrier.cuh"
#include "topk_loads.cuh"
#include "handle_rows.cuh"

namespace deep_ep_ops {
namespace dev {

// Ints of shared memory the count phases take with nw counting warps.
__host__ __device__ constexpr size_t count_smem_ints(int nw, int E, int R) {
  return static_cast<size_t>(nw) * (2 * E + R) + (3 * E + R + 40);
}

// The count phases' shared memory (carved from count_smem_ints(nw, E, R) ints).
struct CountSmem {
  unsigned* emask;  // [nw][E] which lanes of warp w hold expert e
  int* cnt;         // [nw][E + R] warp histograms, then their exclusive scan over warps
  int* tot;         // [E + R] this rank's totals
  int* sc;          // [E] aligned totals, then their scan
  int* eb;          // [E] sum_{s<me} count(s, e)
  int* wsum;        // [32]
  int* misc;        // [8]
};

__device__ __forceinline__ CountSmem carve_count_smem(int* smem, int nw, int E, int R) {
  CountSmem m;
  const int NC = E + R;
  m.emask = reinterpret_cast<unsigned*>(smem);
  m.cnt = smem + nw * E;
  m.tot = m.cnt + nw * NC;
  m.sc = m.tot + NC;
  m.eb = m.sc + E;
  m.wsum = m.eb + E;
  m.misc = m.wsum + kWarp;
  return m;
}

// Exclusive scan of a[0..n) in place by the whole CTA; returns the total. wsum: 32 ints of
// shared memory. Every thread of the CTA must call it.
__device__ inline int block_exclusive_scan(int* a, int n, int* wsum) {
  const int lane = lane_id(), w = warp_id(), nw = blockDim.x / kWarp;
  int carry = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int v = i < n ? a[i] : 0;
    int x = v;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == kWarp - 1) wsum[w] = x;
    __syncthreads();
    if (w == 0) {
      int s = lane < nw ? wsum[lane] : 0;
#pragma unroll
      for (int o = 1; o < kWarp; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
      }
      wsum[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    if (i < n) a[i] = carry + (w > 0 ? wsum[w - 1] : 0) + x - v;
    carry += wsum[nw - 1];
    __syncthreads();
  }
  return carry;
}

// This call's epoch of the count exchange and of the entry: every kernel of the call reads the
// same value (the layout's CTAs, the push's, late ones too), since only what ends the call
// after all of them stores it (the epilogue, or the push's last CTA: dispatch.cu
// end_dispatch_call; one rank has no waits). Never 0 (after 2^32 calls it goes on at 1): 0 is
// what bases_ready and a token word hold before they are written, and the epoch flags compare
// wrap-safe.
__device__ __forceinline__ uint32_t layout_epoch(const unsigned* epochs) {
  const uint32_t next = *reinterpret_cast<const volatile unsigned*>(epochs + kLayoutSlot) + 1u;
  return next != 0u ? next : 1u;
}

// Entry (one thread, once every earlier kernel of this rank is done): where this rank's outputs
// live (the peers write their rows, and their routing, there when it is not -1), announced at
// once, so the peers may write into its window and output slot from now on.
__device__ __forceinline__ void announce_entry(const LayoutParams& p, uint32_t epoch) {
  const int R = p.comm.num_ranks, me = p.comm.rank;
  if (R == 1) return;
  for (int peer = 0; peer < R; ++peer) {
    long long* outs =
        reinterpret_cast<long long*>(peer_ptr(p.comm, peer) + p.comm.outs_off) + kOutsPerRank * me;
    outs[0] = p.out_x_off;
    outs[1] = p.out_s_off;
    outs[2] = p.out_r_off;
  }
  announce_epoch(p.comm, kEnterSlot, epoch);
}

// Counts block b with warps [0, nw) (the CTA's other warps only join its barriers): tok_rank
// and tok_dmask of its tokens and its histogram cta_prefix[b]. KMAX bounds the per-lane topk
// arrays: 8 keeps them in registers for the usual K <= 8. Every thread of the CTA calls it.
template <int KMAX>
__device__ __forceinline__ void count_block(const LayoutParams& p, int b, int nw, const CountSmem& m) {
  const int E = p.E, R = p.comm.num_ranks, K = p.K, NC = E + R;
  const int w = warp_id(), lane = lane_id();
  const bool counts = w < nw;
  const int t = b * p.cta_tokens + w * kWarp + lane;
  const bool valid = counts && t < p.T;
  unsigned* my_mask = m.emask + w * E;
  int* my_cnt = m.cnt + w * NC;
  // (profiling; the clock only grows, so the latest block of the latest call wins, no reset)
  if (threadIdx.x == 0) atomicMax(p.s.kernel_times + kCountStarted, global_ns());
  if (counts) {
    for (int e = lane; e < E; e += kWarp) my_mask[e] = 0u;
  }
  __syncwarp();

  // ---- ranks among this warp's 32 tokens ----
  // (a slot's destination rank is recomputed from its expert where needed: the registers matter
  // where this runs inside the pipelined push)
  int ex[KMAX], rk[KMAX];
  unsigned dmask = 0;
  // Every slot's load in flight before the first use (the one-rank dispatch's order), not each
  // load followed by its atomic under branches, which the compiled code runs as a chain of K
  // round trips. Measured, it did not shorten the count (bench/NOTES.md v22): the count's
  // ~4.5 us against ~1.8 in the count probe has another cause.
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    ex[k] = k < K && valid ? load_expert(p.topk_idx, p.idx64, static_cast<int64_t>(t) * K + k) : -1;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    rk[k] = 0;
    if (ex[k] >= 0) {
      dmask |= 1u << (ex[k] / p.E_loc);
      atomicOr(&my_mask[ex[k]], 1u << lane);  // OR commutes: deterministic
    }
  }
  __syncwarp();
  if (counts) {
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (ex[k] >= 0) rk[k] = __popc(my_mask[ex[k]] & lanemask_lt()) << 16;
    unsigned mybal = 0;  // lane d < R: which lanes send to rank d
    for (int d = 0; d < R; ++d) {
      const unsigned bal = __ballot_sync(0xffffffffu, (dmask >> d) & 1u);
      if (lane == d) mybal = bal;
    }
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k >= K) break;  // K is warp-uniform: the shuffle stays converged
      const unsigned bal = __shfl_sync(0xffffffffu, mybal, ex[k] >= 0 ? ex[k] / p.E_loc : 0);
      if (ex[k] >= 0) rk[k] |= __popc(bal & lanemask_lt());
    }
    for (int e = lane; e < E; e += kWarp) my_cnt[e] = __popc(my_mask[e]);
    if (lane < R) my_cnt[E + lane] = __popc(mybal);
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(p.s.kernel_times + kCountLoaded, global_ns());

  // ---- scan over the counting warps; the block's histogram; ranks among the block ----
  int* agg = p.s.cta_prefix + static_cast<int64_t>(b) * NC;
  for (int c = threadIdx.x; c < NC; c += blockDim.x) {
    int run = 0;
    for (int v = 0; v < nw; ++v) {
      const int x = m.cnt[v * NC + c];
      m.cnt[v * NC + c] = run;
      run += x;
    }
    agg[c] = run;
  }
  __syncthreads();
  if (valid) {
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (ex[k] >= 0)  // both ranks < cta_tokens <= 32 * 32: 16 bits each
        p.s.tok_rank[static_cast<int64_t>(t) * K + k] =
            rk[k] + (my_cnt[ex[k]] << 16) + my_cnt[E + ex[k] / p.E_loc];
    p.s.tok_dmask[t] = dmask;
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(p.s.kernel_times + kCountStored, global_ns());
}

// After count_block: whether this CTA's block was the last of `blocks` to be counted, by the
// threadFenceReduction pattern (integer sums, so which CTA it is does not matter); when it was,
// every block's counts are visible to it. A lone block skips the fence and the ticket (~2 us of
// round trips: its own histogram is visible to its threads after the barrier). flag: a shared
// int; fenced: the block's stores were fenced and the CTA synced since (announce_block_words),
// so the ticket needs no fence of its own. Every thread of the CTA.
__device__ __forceinline__ bool counted_last_block(const LayoutParams& p, int blocks, int* flag,
                                                   bool fenced = false) {
  if (blocks == 1) {
    __syncthreads();
    return true;
  }
  if (!fenced) __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(p.s.done, 1u) == static_cast<unsigned>(blocks - 1);
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// Where rank s's token count to rank d is announced in rank `at`'s window (EpWindow: [tokens]).
__device__ __forceinline__ unsigned long long* tokens_word(const Comm& c, int at, int s, int d) {
  return reinterpret_cast<unsigned long long*>(peer_ptr(c, at) + c.tokens_off) + s * kMaxRanks + d;
}

// Where rank s's count block b announces its tokens to rank d in rank `at`'s window (EpWindow:
// [blocks]).
__device__ __forceinline__ unsigned long long* block_word(const Comm& c, int at, int s, int b, int d) {
  const int R = c.num_ranks;
  return reinterpret_cast<unsigned long long*>(peer_ptr(c, at) + c.blocks_off) +
         (static_cast<int64_t>(s) * c.max_blocks + b) * R + d;
}

// After count_block (layout kernel, R > 1): block b's tokens to each rank, as one word each
// ((epoch << 32) | (blocks << 16) | count) into this rank's window and every higher rank's, so
// a compact push builds its bases from the blocks' own words (dispatch.cu wait_block_words)
// instead of waiting for the publisher's scan and flags. The block's tok_rank / tok_dmask
// stores are fenced before its words: this rank's push reads them once it has seen the words.
// Every thread of the CTA.
__device__ __forceinline__ void announce_block_words(const LayoutParams& p, int b, int blocks,
                                                     uint32_t epoch) {
  const int R = p.comm.num_ranks, me = p.comm.rank, NC = p.E + R;
  __threadfence();
  __syncthreads();
  const int* agg = p.s.cta_prefix + static_cast<int64_t>(b) * NC + p.E;  // count_block's histogram
  for (int i = threadIdx.x; i < (R - me) * R; i += blockDim.x) {
    const int at = me + i / R, d = i % R;
    const unsigned low = (static_cast<unsigned>(blocks) << 16) | static_cast<unsigned>(ld_cg(agg + d));
    st_relaxed_sys(block_word(p.comm, at, me, b, d), epoch_word(epoch, low));
  }
}

// A block word's low half (wait_epoch_word's value), as announce_block_words packed it: the
// block's tokens to the word's rank, and how many count blocks the announcing rank has.
__device__ __forceinline__ int block_word_tokens(long long low) { return static_cast<int>(low & 0xffff); }
__device__ __forceinline__ int block_word_blocks(long long low) { return static_cast<int>(low >> 16); }

// tok_rank's low half (count_block): the token's rank among its count block's tokens sent to
// the slot's rank, i.e. its compact row's offset from the block's base there.
__device__ __forceinline__ int tok_rank_in_block(int tok_rank) { return tok_rank & 0xffff; }

// Column c of the count blocks' histograms (cta_prefix[b][c], b < blocks) scanned in place into
// exclusive per-block prefixes; returns the column's total. One batch of loads covers the usual
// 16 blocks: one round trip.
__device__ __forceinline__ int scan_column(int* pre, int blocks, int NC, int c) {
  constexpr int kBatch = 16;
  int run = 0;
  for (int b = 0; b < blocks; b += kBatch) {
    int v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (b + u < blocks) v[u] = ld_cg(pre + static_cast<int64_t>(b + u) * NC + c);
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (b + u < blocks) {
        pre[static_cast<int64_t>(b + u) * NC + c] = run;
        run += v[u];
      }
  }
  return run;
}

// The CTA that counted the last of `blocks` blocks (its counts and every other block's are
// visible to it): first the per-rank columns of the scan over blocks (what a compact push
// needs), this rank's token count to each rank as one word with the epoch to every higher rank
// (their pushes start their compact rows after them) and the flag that says the compact bases'
// local terms are final (bases_ready = epoch: the push starts on it and on the lower ranks'
// words); then the per-expert columns, and this rank's count row to every peer, announced on
// the layout slot (the per-expert part waits for every peer's row). info[3..4]: ns from t_start
// when counted, published. Every thread of the CTA.
__device__ __forceinline__ void publish_counts(const LayoutParams& p, int blocks, uint32_t epoch,
                                      const CountSmem& m, unsigned long long t_start) {
  const int E = p.E, R = p.comm.num_ranks, NC = E + R, me = p.comm.rank;
  int* info = p.s.recv_info;
  if (threadIdx.x == 0) {
    if (blocks > 1) *p.s.done = 0u;  // ready for the next call (every block of this one counted)
    info[3] = static_cast<int>(global_ns() - t_start);
    p.s.kernel_times[kLayoutLastCta] = t_start;
  }
  int* pre = p.s.cta_prefix;
  for (int d = threadIdx.x; d < R; d += blockDim.x) m.tot[E + d] = scan_column(pre, blocks, NC, E + d);
  __syncthreads();
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int peer = i / R, d = i % R;
    if (peer > me)  // only higher ranks' rows follow this rank's
      st_relaxed_sys(tokens_word(p.comm, peer, me, d),
                     epoch_word(epoch, static_cast<uint32_t>(m.tot[E + d])));
  }
  __syncthreads();  // (the block's prefix stores, before the flag that publishes them)
  if (threadIdx.x == 0 && R > 1) st_release_gpu(p.s.bases_ready, epoch);  // read by this GPU only
  for (int e = threadIdx.x; e < E; e += blockDim.x) m.tot[e] = scan_column(pre, blocks, NC, e);
  __syncthreads();
  for (int i = threadIdx.x; i < R * NC; i += blockDim.x) {
    const int peer = i / NC, c = i % NC;
    int* row = reinterpret_cast<int*>(peer_ptr(p.comm, peer) + p.comm.counts_off) + me * NC;
    row[c] = m.tot[c];
  }
  if (threadIdx.x == 0) info[4] = static_cast<int>(global_ns() - t_start);
  __syncthreads();
  if (R > 1 && threadIdx.x == 0) announce_epoch(p.comm, kLayoutSlot, epoch);
}

// The publisher, after publish_counts: once every peer's count row is in, the per-expert part
// (ebase, tokens per expert and block starts in recv_info, the received totals), the handle's
// header row into `header` (W ints) and the end stamps. info[5]: ns from t_start when every
// row was in. Every thread of the CTA.
__device__ __forceinline__ void expert_part(const LayoutParams& p, uint32_t epoch, const CountSmem& m,
                                   unsigned long long t_start, int* header) {
  const int E = p.E, R = p.comm.num_ranks, NC = E + R, me = p.comm.rank;
  int* info = p.s.recv_info;
  const unsigned every_peer = R >= 32 ? 0xffffffffu : (1u << R) - 1u;
  const int* counts = reinterpret_cast<const int*>(peer_ptr(p.comm, me) + p.comm.counts_off);
  if (threadIdx.x == 0) m.misc[1] = 0;
  __syncthreads();
  if (R > 1) wait_epochs(p.comm, kLayoutSlot, epoch, every_peer, kOpDispatchLayout);
  if (threadIdx.x == 0) info[5] = static_cast<int>(global_ns() - t_start);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int sum = 0, lower = 0;
    for (int s = 0; s < R; ++s) {
      const int v = ld_cg(counts + s * NC + e);
      sum += v;
      if (s < me) lower += v;
    }
    m.eb[e] = lower;
    m.sc[e] = static_cast<int>(align_up(sum, p.A));
    if (e / p.E_loc == me) {
      info[kRecvTpe + (e - me * p.E_loc)] = sum;
      atomicAdd(&m.misc[1], sum);  // integer sum: order does not matter
    }
  }
  if (threadIdx.x == 0) {
    int G = 0;
    for (int s = 0; s < R; ++s) G += ld_cg(counts + s * NC + E + me);
    m.misc[0] = G;
    info[kRecvG] = G;
  }
  __syncthreads();
  // Block starts: exclusive scan of the aligned totals, relative to each destination's range.
  const int total = block_exclusive_scan(m.sc, E, m.wsum);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int d = e / p.E_loc;
    const int start = m.sc[d * p.E_loc];
    p.s.ebase[e] = m.eb[e] + m.sc[e] - start;
    if (d == me) info[kRecvTpe + p.E_loc + (e - me * p.E_loc)] = m.sc[e] - start;
  }
  if (threadIdx.x == 0) {
    const int lo = m.sc[me * p.E_loc];
    const int hi = (me + 1) * p.E_loc < E ? m.sc[(me + 1) * p.E_loc] : total;
    info[kRecvTpe + 2 * p.E_loc] = hi - lo;
    info[kRecvAligned] = hi - lo;
    int below = 0;  // my own tokens' compact rows here: [below, below + tot[E + me])
    for (int s = 0; s < me; ++s) below += ld_cg(counts + s * NC + E + me);
    info[recv_local_lo(p.E_loc)] = below;
    info[recv_local_n(p.E_loc)] = m.tot[E + me];
    const int pairs = m.misc[1];
    info[kRecvPairs] = pairs;
    write_header_row(header, p.W,
                     HandleHeader{p.expand ? pairs : m.misc[0], m.misc[0], p.T, R, E, p.M, p.expand,
                                  p.A, p.K, p.buffer_id, p.C});
    const unsigned long long t_end = global_ns();
    info[6] = static_cast<int>(t_end - t_start);
    info[7] = info[6];
    p.s.kernel_times[kLayoutEnd] = t_end;
  }
}

}  // namespace dev
}  // namespace deep_ep_ops
