// Dispatch, phase 1: where every (token, topk slot) of this rank lands, without atomics whose
// order matters and without sorting.
//
// Many CTAs; CTA b counts tokens [b*cta_tokens, (b+1)*cta_tokens), one warp per 32 tokens
// (lane = token). For each expert, the lanes holding it OR their bit into a warp-private mask
// word, so a token's rank among the warp's tokens of that expert is the popcount of the lower
// lanes; ballots do the same per destination rank. A scan over the CTA's warps turns these into
// ranks among the CTA's tokens (tok_rank) and gives the CTA's histogram (cta_prefix[b]).
// The last CTA to finish (atomic ticket; integer sums, so which one it is does not matter)
// scans the histograms over CTAs in CTA order (exclusive per-CTA prefixes, in place), sends
// the count row [E per-expert counts, R per-rank token counts] to every peer's window and
// derives the bases at every destination from the count matrix:
//   compact row at d       = cbase[d] + prefix(CTA of t)[E + d] + rank of t in its CTA to d
//   cbase[d]               = sum_{s<me} tokens(s->d)
//   expert-major row at d  = ebase[e] + prefix(CTA of t)[e] + rank of t in its CTA for e
//   ebase[e]               = aligned block start of e + sum_{s<me} count(s,e)
// The compact bases need the rows of the lower ranks only: as soon as those are in (and every
// peer has entered the call, below), the bases are ready and a flag says so (a compact push
// starts on it), while this CTA waits for the higher ranks' rows for the per-expert part. So
// rank 0's rows start moving without waiting for anyone's count. The push kernel adds the three
// terms per (token, slot), so the rows are the same pure function of the routing as in a
// one-pass serial count: (source rank, source token) order.
// Entry: CTA 0 tells every peer at once where this rank's recv_x / recv_scales live (a
// direct-output slot of its window, where the peers' pushes then write rows straight, or -1)
// and announces that it entered the call, so the peers may write into its window.
#include "ep_barrier.cuh"
#include "../host/cuda_check.hpp"
#include "topk_loads.cuh"
#include "handle_rows.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

// Exclusive scan of a[0..n) in place by the whole CTA; returns the total. wsum: 32 ints of
// shared memory. Every thread of the CTA must call it.
__device__ int block_exclusive_scan(int* a, int n, int* wsum) {
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

constexpr int kLayoutMaxWarps = 8;

// KMAX bounds the per-lane topk arrays: 8 keeps them in registers for the usual K <= 8.
template <int KMAX>
__global__ void __launch_bounds__(kLayoutMaxWarps * kWarp) layout_kernel(LayoutParams p) {
  extern __shared__ int smem[];
  __shared__ int is_last;
  pdl_wait();
  pdl_trigger();
  // Phase timestamps (ns since the last CTA started) for profiling: recv_info[3..7].
  const unsigned long long t_start = global_ns();
  const int E = p.E, R = p.comm.num_ranks, K = p.K, NC = E + R;
  const int me = p.comm.rank;
  // this call's epoch of the count exchange and of the entry (the last CTA stores it at its end)
  const uint32_t epoch = *reinterpret_cast<volatile unsigned*>(p.comm.epochs + kLayoutSlot) + 1u;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.s.kernel_times[kLayoutStart] = t_start;
    // the previous push finished (its epilogue, which waited for it, preceded this grid), and
    // this call's push takes tickets only after waiting for this grid
    *p.s.push_ticket = 0u;
    if (R > 1) {
      // Entry: where this rank's outputs live (peers write their rows there when it is not -1),
      // announced at once. Every earlier kernel of this rank is done (pdl_wait above), so the
      // peers may write into its window and output slot from now on.
      for (int peer = 0; peer < R; ++peer) {
        long long* outs = reinterpret_cast<long long*>(peer_ptr(p.comm, peer) + p.comm.outs_off) + 2 * me;
        outs[0] = p.out_x_off;
        outs[1] = p.out_s_off;
      }
      announce_epoch(p.comm, kEnterSlot, epoch);
    }
  }
  const int nw = blockDim.x / kWarp;
  unsigned* emask = reinterpret_cast<unsigned*>(smem);  // [nw][E]
  int* cnt = smem + nw * E;                             // [nw][E + R]
  int* tot = cnt + nw * NC;                             // [E + R] my totals
  int* sc = tot + NC;                                   // [E] aligned totals, then their scan
  int* eb = sc + E;                                     // [E] sum_{s<me} count(s, e)
  int* wsum = eb + E;                                   // [32]
  int* misc = wsum + kWarp;                             // [8]

  const int w = warp_id(), lane = lane_id();
  unsigned* my_mask = emask + w * E;
  int* my_cnt = cnt + w * NC;
  const int t = blockIdx.x * p.cta_tokens + w * kWarp + lane;
  const bool valid = t < p.T;
  for (int e = lane; e < E; e += kWarp) my_mask[e] = 0u;
  __syncwarp();

  // ---- phase 1: ranks among this warp's 32 tokens ----
  int ex[KMAX], dk[KMAX], rk[KMAX];
  unsigned dmask = 0;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    ex[k] = -1;
    dk[k] = 0;
    rk[k] = 0;
    if (k < K && valid) ex[k] = load_expert(p.topk_idx, p.idx64, static_cast<int64_t>(t) * K + k);
    if (ex[k] >= 0) {
      dk[k] = ex[k] / p.E_loc;
      dmask |= 1u << dk[k];
      atomicOr(&my_mask[ex[k]], 1u << lane);  // OR commutes: deterministic
    }
  }
  __syncwarp();
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (ex[k] >= 0) rk[k] = __popc(my_mask[ex[k]] & lanemask_lt()) << 16;
  unsigned mybal = 0;  // lane d < R: which lanes send to rank d
  for (int d = 0; d < R; ++d) {
    const unsigned b = __ballot_sync(0xffffffffu, (dmask >> d) & 1u);
    if (lane == d) mybal = b;
  }
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    if (k >= K) break;  // K is warp-uniform: the shuffle stays converged
    const unsigned b = __shfl_sync(0xffffffffu, mybal, dk[k]);
    if (ex[k] >= 0) rk[k] |= __popc(b & lanemask_lt());
  }
  for (int e = lane; e < E; e += kWarp) my_cnt[e] = __popc(my_mask[e]);
  if (lane < R) my_cnt[E + lane] = __popc(mybal);
  __syncthreads();

  // ---- phase 2: scan over the CTA's warps; the CTA's histogram; ranks among the CTA ----
  {
    int* agg = p.s.cta_prefix + static_cast<int64_t>(blockIdx.x) * NC;
    for (int c = threadIdx.x; c < NC; c += blockDim.x) {
      int run = 0;
      for (int v = 0; v < nw; ++v) {
        const int x = cnt[v * NC + c];
        cnt[v * NC + c] = run;
        run += x;
      }
      agg[c] = run;
    }
  }
  __syncthreads();
  if (valid) {
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      if (ex[k] >= 0)  // both ranks < cta_tokens <= 256: 16 bits each
        p.s.tok_rank[static_cast<int64_t>(t) * K + k] =
            rk[k] + (my_cnt[ex[k]] << 16) + my_cnt[E + dk[k]];
    p.s.tok_dmask[t] = dmask;
  }
  // Last CTA to finish goes on (threadFenceReduction pattern). A lone CTA (T <= cta_tokens:
  // every decode batch) skips the fence and the ticket, ~2 us of round trips: its own
  // histogram writes are visible to its threads after the barrier.
  const bool many = gridDim.x > 1;
  if (many) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(p.s.done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
  } else {
    __syncthreads();
  }

  // ---- phase 3 (last CTA): scan over CTAs, publish my count row ----
  int* info = p.s.recv_info;
  if (threadIdx.x == 0) {
    if (many) *p.s.done = 0u;  // ready for the next call (every CTA of this one has counted)
    info[3] = static_cast<int>(global_ns() - t_start);
    p.s.kernel_times[kLayoutLastCta] = t_start;
  }
  {
    const int N = gridDim.x;
    int* pre = p.s.cta_prefix;
    for (int c = threadIdx.x; c < NC; c += blockDim.x) {
      int run = 0, b = 0;
      for (; b + 8 <= N; b += 8) {
        int v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = ld_cg(pre + static_cast<int64_t>(b + u) * NC + c);
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          pre[static_cast<int64_t>(b + u) * NC + c] = run;
          run += v[u];
        }
      }
      for (; b < N; ++b) {
        const int x = ld_cg(pre + static_cast<int64_t>(b) * NC + c);
        pre[static_cast<int64_t>(b) * NC + c] = run;
        run += x;
      }
      tot[c] = run;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * NC; i += blockDim.x) {
    const int peer = i / NC, c = i % NC;
    int* row = reinterpret_cast<int*>(peer_ptr(p.comm, peer) + p.comm.counts_off) + me * NC;
    row[c] = tot[c];
  }
  if (threadIdx.x == 0) info[4] = static_cast<int>(global_ns() - t_start);
  // Compact rows at d follow those of the lower ranks only: the compact bases wait for their
  // count rows and for every peer's entry (its output places), not for the higher ranks' rows,
  // which only the per-expert part below needs (ordered = 0: all rows first, one barrier).
  const unsigned every_peer = R >= 32 ? 0xffffffffu : (1u << R) - 1u, lower_peers = (1u << me) - 1u;
  __syncthreads();
  if (R > 1) {
    if (threadIdx.x == 0) announce_epoch(p.comm, kLayoutSlot, epoch);
    wait_epochs(p.comm, kEnterSlot, epoch, every_peer, kOpDispatchLayout);
    wait_epochs(p.comm, kLayoutSlot, epoch, p.ordered ? lower_peers : every_peer, kOpDispatchLayout);
  }
  if (threadIdx.x == 0) info[5] = static_cast<int>(global_ns() - t_start);

  // ---- phase 4 (last CTA): bases from the full count matrix ----
  const int* counts = reinterpret_cast<const int*>(peer_ptr(p.comm, me) + p.comm.counts_off);
  // compact bases first: with them (and the CTA prefixes, the peers' output places) a compact
  // push can start while this CTA works out the per-expert part
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    int below = 0;
    for (int s = 0; s < me; ++s) below += ld_cg(counts + s * NC + E + d);
    p.s.cbase[d] = below;
  }
  if (threadIdx.x == 0) misc[1] = 0;
  __syncthreads();
  if (threadIdx.x == 0 && R > 1) {
    __threadfence();
    st_release_sys(p.s.bases_ready, 1u);
  }
  if (R > 1 && p.ordered) wait_epochs(p.comm, kLayoutSlot, epoch, every_peer & ~lower_peers, kOpDispatchLayout);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int sum = 0, lower = 0;
    for (int s = 0; s < R; ++s) {
      const int v = ld_cg(counts + s * NC + e);
      sum += v;
      if (s < me) lower += v;
    }
    eb[e] = lower;
    sc[e] = static_cast<int>(dev::align_up(sum, p.A));
    if (e / p.E_loc == me) {
      info[kRecvTpe + (e - me * p.E_loc)] = sum;
      atomicAdd(&misc[1], sum);  // integer sum: order does not matter
    }
  }
  if (threadIdx.x == 0) {
    int G = 0;
    for (int s = 0; s < R; ++s) G += ld_cg(counts + s * NC + E + me);
    misc[0] = G;
    info[kRecvG] = G;
  }
  __syncthreads();
  // Block starts: exclusive scan of the aligned totals, relative to each destination's range.
  const int total = block_exclusive_scan(sc, E, wsum);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int d = e / p.E_loc;
    const int start = sc[d * p.E_loc];
    p.s.ebase[e] = eb[e] + sc[e] - start;
    if (d == me) info[kRecvTpe + p.E_loc + (e - me * p.E_loc)] = sc[e] - start;
  }
  if (threadIdx.x == 0) {
    const int lo = sc[me * p.E_loc];
    const int hi = (me + 1) * p.E_loc < E ? sc[(me + 1) * p.E_loc] : total;
    info[kRecvTpe + 2 * p.E_loc] = hi - lo;
    info[kRecvAligned] = hi - lo;
    int below = 0;  // my own tokens' compact rows here: [below, below + tot[E + me])
    for (int s = 0; s < me; ++s) below += ld_cg(counts + s * NC + E + me);
    info[recv_local_lo(p.E_loc)] = below;
    info[recv_local_n(p.E_loc)] = tot[E + me];
    const int pairs = misc[1];
    info[kRecvPairs] = pairs;
    // handle header row
    write_header_row(p.s.send_handle, p.W,
                     HandleHeader{p.expand ? pairs : misc[0], misc[0], p.T, R, E, p.M, p.expand,
                                  p.A, K, p.buffer_id, p.C});
    const unsigned long long t_end = global_ns();
    info[6] = static_cast<int>(t_end - t_start);
    info[7] = info[6];
    p.s.kernel_times[kLayoutEnd] = t_end;
    p.comm.epochs[kLayoutSlot] = epoch;  // (after every wait of this call on it)
  }
}

size_t layout_smem_bytes(int warps, int E, int R) {
  return (static_cast<size_t>(warps) * (2 * E + R) + (3 * E + R + 40)) * sizeof(int);
}

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
  const int ctas = p.T > 0 ? (p.T + p.cta_tokens - 1) / p.cta_tokens : 1;
  return launch_pdl(small ? layout_kernel<8> : layout_kernel<kMaxTopk>, ctas,
                    p.warps * dev::kWarp, smem, stream, p);
}

}  // namespace deep_ep_ops
