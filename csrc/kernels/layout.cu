// Dispatch, phase 1: where every (token, topk slot) of this rank lands, without atomics whose
// order matters and without sorting.
//
// One CTA. Warp w owns a contiguous chunk of tokens and walks it 32 tokens at a time (lane =
// token). For each expert, the lanes holding it OR their bit into a warp-private mask word, so
// a token's rank among the chunk's tokens of that expert is the popcount of the lower lanes
// plus the warp's running count; ballots do the same per destination rank. A scan over warps
// turns warp-relative ranks into rank-wide ones. The count row [E per-expert counts, R
// per-rank token counts] then goes to every peer's window, one barrier, and each rank derives
// the final rows at every destination from the full count matrix:
//   compact row at d       = sum_{s<me} tokens(s->d) + rank of t among my tokens to d
//   expert-major row at d  = aligned block start of e + sum_{s<me} count(s,e) + rank of t in e
#include "barrier.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// KMAX bounds the per-lane topk arrays: 8 keeps them in registers for the usual K <= 8.
template <int KMAX>
__global__ void __launch_bounds__(1024, 1) layout_kernel(LayoutParams p) {
  extern __shared__ int smem[];
  // Phase timestamps (ns since kernel start) for profiling: recv_info[3..6].
  const unsigned long long t_start = global_ns();
  const int E = p.E, R = p.comm.num_ranks, K = p.K, NC = E + R;
  const int me = p.comm.rank;
  int* cnt = smem;                                                  // [warps][E + R]
  unsigned* emask = reinterpret_cast<unsigned*>(cnt + p.warps * NC);  // [warps][E]
  int* tot = reinterpret_cast<int*>(emask + p.warps * E);           // [E + R] my totals
  int* ebase = tot + NC;                                            // [E]
  int* cbase = ebase + E;                                           // [R]
  int* misc = cbase + R;                                            // [8]

  for (int i = threadIdx.x; i < p.warps * NC; i += blockDim.x) cnt[i] = 0;
  for (int i = threadIdx.x; i < p.warps * E; i += blockDim.x) emask[i] = 0;
  __syncthreads();

  const int w = warp_id(), lane = lane_id();
  int* my_cnt = cnt + w * NC;
  unsigned* my_mask = emask + w * E;
  const int t_begin = w * p.chunk;
  const int t_end = min(p.T, t_begin + p.chunk);
  int rank_count = 0;  // lane d < R: tokens of this warp sent to rank d so far

  // ---- phase 1: warp-relative ranks ----
  for (int t0 = t_begin; t0 < t_end; t0 += kWarp) {
    const int t = t0 + lane;
    const bool valid = t < t_end;
    unsigned dmask = 0;
    int ex[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k >= K) break;
      ex[k] = valid ? load_expert(p.topk_idx, p.idx64, static_cast<int64_t>(t) * K + k) : -1;
      if (ex[k] >= 0) {
        dmask |= 1u << (ex[k] / p.E_loc);
        atomicOr(&my_mask[ex[k]], 1u << lane);  // OR commutes: deterministic
      }
    }
    __syncwarp();
    int newcnt[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k >= K) break;
      newcnt[k] = -1;
      if (ex[k] >= 0) {
        const unsigned m = my_mask[ex[k]];
        const int before = my_cnt[ex[k]];
        p.s.tok_exprank[static_cast<int64_t>(t) * K + k] = before + __popc(m & lanemask_lt());
        if ((m >> lane) == 1u) newcnt[k] = before + __popc(m);  // highest lane updates
      }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k >= K) break;
      if (newcnt[k] >= 0) my_cnt[ex[k]] = newcnt[k];
      if (ex[k] >= 0) my_mask[ex[k]] = 0u;
    }
    __syncwarp();
    // per destination rank
    for (int d = 0; d < R; ++d) {
      const unsigned b = __ballot_sync(0xffffffffu, (dmask >> d) & 1u);
      const int base = __shfl_sync(0xffffffffu, rank_count, d);
      if ((dmask >> d) & 1u) {
        const int pos = base + __popc(b & lanemask_lt());
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          if (k >= K) break;
          if (ex[k] >= 0 && ex[k] / p.E_loc == d)
            p.s.tok_dstrank[static_cast<int64_t>(t) * K + k] = pos;
        }
      }
      if (lane == d) rank_count += __popc(b);
    }
    if (valid) p.s.tok_dmask[t] = dmask;
  }
  if (lane < R) my_cnt[E + lane] = rank_count;
  __syncthreads();
  if (threadIdx.x == 0) p.s.recv_info[3] = static_cast<int>(global_ns() - t_start);

  // ---- phase 2: scan over warps, publish my count row ----
  for (int c = threadIdx.x; c < NC; c += blockDim.x) {
    int run = 0;
    for (int v = 0; v < p.warps; ++v) {
      const int x = cnt[v * NC + c];
      cnt[v * NC + c] = run;
      run += x;
    }
    tot[c] = run;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * NC; i += blockDim.x) {
    const int peer = i / NC, c = i % NC;
    int* row = reinterpret_cast<int*>(p.comm.peer_base[peer] + p.comm.counts_off) + me * NC;
    row[c] = tot[c];
  }
  if (threadIdx.x == 0) p.s.recv_info[4] = static_cast<int>(global_ns() - t_start);
  cta_barrier(p.comm, kLayoutSlot, kOpDispatchLayout);
  if (threadIdx.x == 0) p.s.recv_info[5] = static_cast<int>(global_ns() - t_start);

  // ---- phase 3: offsets from the full count matrix ----
  const int* counts = reinterpret_cast<const int*>(p.comm.peer_base[me] + p.comm.counts_off);
  int* info = p.s.recv_info;
  if (threadIdx.x == 0) misc[1] = 0;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int all = 0, below = 0;
    for (int s = 0; s < R; ++s) {
      const int v = ld_cg(counts + s * NC + e);
      all += v;
      if (s < me) below += v;
    }
    ebase[e] = below;
    tot[e] = static_cast<int>(align_up(all, p.A));  // reuse: aligned totals
    if (e / p.E_loc == me) {
      info[kRecvTpe + (e - me * p.E_loc)] = all;
      atomicAdd(&misc[1], all);  // integer sum: order does not matter
    }
  }
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    int below = 0;
    for (int s = 0; s < me; ++s) below += ld_cg(counts + s * NC + E + d);
    cbase[d] = below;
  }
  __syncthreads();
  // Block starts inside each destination's expert range (serial per destination: E_loc is
  // small and this runs once per dispatch).
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    int run = 0;
    for (int j = 0; j < p.E_loc; ++j) {
      const int e = d * p.E_loc + j;
      if (d == me) info[kRecvTpe + p.E_loc + j] = run;
      const int a = tot[e];
      ebase[e] += run;
      run += a;
    }
    if (d == me) {
      info[kRecvTpe + 2 * p.E_loc] = run;
      info[kRecvAligned] = run;
    }
  }
  if (threadIdx.x == 0) {
    int G = 0;
    for (int s = 0; s < R; ++s) G += ld_cg(counts + s * NC + E + me);
    misc[0] = G;
    info[kRecvG] = G;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int pairs = misc[1];
    info[kRecvPairs] = pairs;
    // handle header row
    int* h = p.s.send_handle;
    for (int c = 0; c < p.W; ++c) h[c] = 0;
    h[handle::kHdrValidRows] = p.expand ? pairs : misc[0];
    h[handle::kHdrValidGroups] = misc[0];
    h[handle::kHdrNumTokens] = p.T;
    h[handle::kHdrNumRanks] = R;
    h[handle::kHdrNumExperts] = E;
    h[handle::kHdrMaxTokens] = p.M;
    h[handle::kHdrExpand] = p.expand;
    h[handle::kHdrAlignment] = p.A;
    h[handle::kHdrTopk] = K;
  }

  if (threadIdx.x == 0) p.s.recv_info[6] = static_cast<int>(global_ns() - t_start);
  // ---- phase 4: final rows of my tokens, handle send part ----
  // One (token, slot) per thread and four in flight per thread: the loads are independent,
  // and a token-per-lane loop would wait on them one after another.
  __syncthreads();
  const int64_t TK = static_cast<int64_t>(p.T) * K;
  const int64_t nthreads = blockDim.x;
  for (int64_t base = threadIdx.x; base < TK; base += 4 * nthreads) {
    int e4[4], dr4[4], er4[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t tk = base + u * nthreads;
      e4[u] = tk < TK ? load_expert(p.topk_idx, p.idx64, tk) : -1;
      dr4[u] = (tk < TK && e4[u] >= 0) ? p.s.tok_dstrank[tk] : 0;
      er4[u] = (tk < TK && e4[u] >= 0) ? p.s.tok_exprank[tk] : 0;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t tk = base + u * nthreads;
      if (tk >= TK) break;
      const int t = static_cast<int>(tk / K), k = static_cast<int>(tk % K);
      int* hrow = p.s.send_handle + static_cast<int64_t>(handle::kHeaderRows + t) * p.W;
      const int e = e4[u];
      if (e < 0) {
        hrow[handle::kSendDstRank + k] = -1;
        hrow[handle::send_dst_row(K) + k] = -1;
        p.s.rowe[tk] = -1;
        continue;
      }
      const int* wc = cnt + (t / p.chunk) * NC;  // the scanned bases of t's warp
      const int d = e / p.E_loc;
      const int crow = cbase[d] + wc[E + d] + dr4[u];
      const int erow = ebase[e] + wc[e] + er4[u];
      p.s.rowc[static_cast<int64_t>(t) * R + d] = crow;  // equal for every slot of rank d
      p.s.rowe[tk] = erow;
      hrow[handle::kSendDstRank + k] = d;
      hrow[handle::send_dst_row(K) + k] = p.expand ? erow : crow;
    }
  }
  // per token: destination count, -1 for ranks it skips, trailing columns
  for (int t = threadIdx.x; t < p.T; t += blockDim.x) {
    const unsigned dmask = p.s.tok_dmask[t];
    int* hrow = p.s.send_handle + static_cast<int64_t>(handle::kHeaderRows + t) * p.W;
    hrow[handle::kSendNumDst] = __popc(dmask);
    for (int c = handle::kSendDstRank + 2 * K; c < p.W; ++c) hrow[c] = -1;
    for (int d = 0; d < R; ++d)
      if (!((dmask >> d) & 1u)) p.s.rowc[static_cast<int64_t>(t) * R + d] = -1;
  }
  __syncthreads();
  if (threadIdx.x == 0) p.s.recv_info[7] = static_cast<int>(global_ns() - t_start);
}

}  // namespace

int layout_warps(int E, int R, size_t smem_limit) {
  const size_t fixed = static_cast<size_t>(3 * E + 2 * R + 8) * sizeof(int);
  const size_t per_warp = static_cast<size_t>(2 * E + R) * sizeof(int);
  int warps = 32;
  while (warps > 1 && fixed + per_warp * warps > smem_limit) --warps;
  return warps;
}

size_t layout_smem_bytes(int warps, int E, int R) {
  return static_cast<size_t>(warps) * (2 * E + R) * sizeof(int) +
         static_cast<size_t>(3 * E + 2 * R + 8) * sizeof(int);
}

cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream) {
  const size_t smem = layout_smem_bytes(p.warps, p.E, p.comm.num_ranks);
  // Raise the dynamic shared-memory limit once per size (not per call: keeps capture clean).
  static size_t configured[2] = {48 * 1024, 48 * 1024};
  const bool small = p.K <= 8;
  if (smem > configured[small]) {
    cudaError_t err = cudaFuncSetAttribute(
        small ? layout_kernel<8> : layout_kernel<kMaxTopk>,
        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    configured[small] = smem;
  }
  if (small)
    layout_kernel<8><<<1, p.warps * dev::kWarp, smem, stream>>>(p);
  else
    layout_kernel<kMaxTopk><<<1, p.warps * dev::kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
