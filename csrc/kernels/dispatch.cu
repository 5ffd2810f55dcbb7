// Dispatch, phases 2 and 3.
//
// push: one warp per token. It adds the count kernel's three terms into the token's final rows
// (compact row at each destination rank, expert-major row of each slot), writes the handle's
// header and send part, and writes the token's row, scale packs and a metadata row straight
// into every other destination rank's window at the token's compact row (so the receive order
// (source rank, source token) holds by construction). Rows for this rank itself skip the
// window: they go straight into this rank's outputs (every expert-major row of the token
// here). A token goes to each destination rank once, however many of its experts live there.
// Ends with a per-CTA barrier.
//
// epilogue: local only. Copies the window rows of the other ranks into fresh outputs
// (expanding compact rows into expert-major rows when asked), writes the handle's receive
// part, and zeroes every row that carries no token (padding is always zero).
#include "barrier.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

__global__ void __launch_bounds__(512, 1) dispatch_push_kernel(PushParams p) {
  pdl_wait();
  pdl_trigger();
  const int R = p.comm.num_ranks, K = p.K, me = p.comm.rank, E = p.E, NC = E + R, W = p.W;
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  if (blockIdx.x == 0)  // handle header row
    for (int c = threadIdx.x; c < W; c += blockDim.x) p.handle[c] = p.s.send_handle[c];
  for (int t = blockIdx.x * warps + warp_id(); t < p.T; t += gridDim.x * warps) {
    const unsigned dmask = p.s.tok_dmask[t];
    const int64_t tk = static_cast<int64_t>(t) * K + lane;
    int e = -1;
    float wgt = 0.f;
    if (lane < K) {
      e = load_expert(p.topk_idx, p.idx64, tk);
      wgt = p.topk_weights[tk];
    }
    // final rows of slot `lane`: base + this count-CTA's prefix + rank inside the count-CTA
    const int edst = e >= 0 ? e / p.E_loc : -1;
    int erow = -1, crow = -1;
    if (e >= 0) {
      const int* pre = p.s.cta_prefix + static_cast<int64_t>(t / p.cta_tokens) * NC;
      const int rk = p.s.tok_rank[tk];
      erow = p.s.ebase[e] + pre[e] + (rk >> 16);
      crow = p.s.cbase[edst] + pre[E + edst] + (rk & 0xffff);
    }
    // handle send part: [#destinations, rank of slot k (K), row of slot k (K), -1...]
    {
      int* hrow = p.handle + static_cast<int64_t>(handle::kHeaderRows + t) * W;
      const int sel = p.expand ? erow : crow;
      for (int c0 = 0; c0 < W; c0 += kWarp) {
        const int c = c0 + lane;
        const int k1 = c - handle::kSendDstRank, k2 = c - handle::send_dst_row(K);
        const int v1 = __shfl_sync(0xffffffffu, edst, k1 & (kWarp - 1));
        const int v2 = __shfl_sync(0xffffffffu, sel, k2 & (kWarp - 1));
        int v = -1;
        if (c == handle::kSendNumDst) v = __popc(dmask);
        else if (k1 >= 0 && k1 < K) v = v1;
        else if (k2 >= 0 && k2 < K) v = v2;
        if (c < W) hrow[c] = v;
      }
    }
    const char* xrow = p.x + static_cast<int64_t>(t) * p.x_bytes;
    const char* srow = p.scales + static_cast<int64_t>(t) * p.s_bytes;
    for (unsigned rest = dmask; rest != 0; rest &= rest - 1) {
      const int d = __ffs(rest) - 1;
      const unsigned at_d = __ballot_sync(0xffffffffu, edst == d);  // nonzero: d is in dmask
      if (d == me) {
        // straight into this rank's outputs
        if (!p.expand) {
          const int64_t row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1);
          warp_copy(p.recv_x + row * p.x_bytes, xrow, p.x_bytes);
          if (p.s_bytes > 0) warp_copy(p.recv_s + row * p.s_bytes, srow, p.s_bytes);
        } else {
          for (unsigned m = at_d; m != 0; m &= m - 1) {
            const int64_t row = __shfl_sync(0xffffffffu, erow, __ffs(m) - 1);
            warp_copy(p.recv_x + row * p.x_bytes, xrow, p.x_bytes);
            if (p.s_bytes > 0) warp_copy(p.recv_s + row * p.s_bytes, srow, p.s_bytes);
          }
        }
      }
      const int64_t row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1);
      char* base = peer_ptr(p.comm, d);
      int* meta = reinterpret_cast<int*>(base + p.rows.m_off) + row * p.rows.meta_ints;
      if (lane == 0) {
        meta[0] = me;
        meta[1] = t;
        meta[2] = __popc(dmask & ((1u << d) - 1u));
        meta[3] = 0;
      }
      if (lane < K) {
        const bool here = edst == d;
        meta[4 + lane] = here ? e - d * p.E_loc : -1;
        meta[4 + K + lane] = here ? erow : -1;
        meta[4 + 2 * K + lane] = here ? __float_as_int(wgt) : 0;
      }
      if (d == me) continue;
      warp_copy(base + p.rows.x_off + row * p.rows.x_stride, xrow, p.x_bytes);
      if (p.s_bytes > 0) warp_copy(base + p.rows.s_off + row * p.rows.s_stride, srow, p.s_bytes);
    }
  }
  cta_barrier(p.comm, blockIdx.x, kOpDispatchPush);
}

// Which expert-major row r is: valid (inside its expert's real count) or padding.
__device__ __forceinline__ bool expand_row_valid(const int* tpe, const int* bstart, int E_loc,
                                                 int r) {
  if (r >= bstart[E_loc]) return false;
  int lo = 0, hi = E_loc - 1;  // last j with bstart[j] <= r
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (bstart[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return r - bstart[lo] < tpe[lo];
}

__global__ void __launch_bounds__(512) dispatch_epilogue_kernel(EpilogueParams p) {
  pdl_wait();
  pdl_trigger();
  const int K = p.K, W = p.W;
  const int G = p.recv_info[kRecvG];
  const int* tpe = p.recv_info + kRecvTpe;
  const int* bstart = tpe + p.E_loc;
  const int lane = lane_id();
  const int warps = blockDim.x / kWarp;
  const int gwarp = blockIdx.x * warps + warp_id();
  const int nwarps = gridDim.x * warps;

  // tokens_per_expert (the push kernel wrote the handle's header and send part)
  const int64_t head = static_cast<int64_t>(handle::kHeaderRows + p.T) * W;
  if (blockIdx.x == 0)
    for (int j = threadIdx.x; j < p.E_loc; j += blockDim.x) p.tpe[j] = tpe[j];

  int* recv_h = p.handle + head;
  int64_t* idx64 = static_cast<int64_t*>(p.recv_idx);
  int* idx32 = static_cast<int*>(p.recv_idx);
  for (int i = gwarp; i < p.C; i += nwarps) {
    int* hrow = recv_h + static_cast<int64_t>(i) * W;
    if (i < G) {
      // ---- group i (compact row i in the window) ----
      const int* meta =
          reinterpret_cast<const int*>(p.win + p.rows.m_off) + static_cast<int64_t>(i) * p.rows.meta_ints;
      const int src = meta[0], tok = meta[1], cslot = meta[2];
      const char* wx = p.win + p.rows.x_off + static_cast<int64_t>(i) * p.rows.x_stride;
      const char* ws = p.win + p.rows.s_off + static_cast<int64_t>(i) * p.rows.s_stride;
      int j = -1, erow = -1;
      float wgt = 0.f;
      if (lane < K) {
        j = meta[4 + lane];
        erow = meta[4 + K + lane];
        wgt = __int_as_float(meta[4 + 2 * K + lane]);
      }
      const bool copy = src != p.rank;  // this rank's own rows are already in place
      if (!p.expand) {
        if (copy) {
          warp_copy(p.recv_x + static_cast<int64_t>(i) * p.x_bytes, wx, p.x_bytes);
          if (p.s_bytes > 0) warp_copy(p.recv_s + static_cast<int64_t>(i) * p.s_bytes, ws, p.s_bytes);
        }
        if (lane < K) {
          idx64[static_cast<int64_t>(i) * K + lane] = j;
          p.recv_w[static_cast<int64_t>(i) * K + lane] = wgt;
        }
        for (int c = lane; c < W; c += kWarp) {
          int v = -1;
          if (c == handle::kRecvSrcRank || c == handle::kGroupSrcRank) v = src;
          else if (c == handle::kRecvSrcToken || c == handle::kGroupSrcToken) v = tok;
          else if (c == handle::kRecvGroup || c == handle::kGroupMember) v = i;
          else if (c == handle::kGroupCombineSlot) v = cslot;
          hrow[c] = v;
        }
      } else {
        // members ascending = local expert ids ascending (blocks are in expert order)
        const unsigned local = __ballot_sync(0xffffffffu, j >= 0);
        int members_before = 0;  // members with a smaller expert id than mine
        for (int k = 0; k < K; ++k) {
          const int jk = __shfl_sync(0xffffffffu, j, k);
          if (jk >= 0 && j >= 0 && jk < j) ++members_before;
        }
        for (int c = handle::kGroupSrcRank + lane; c < W; c += kWarp) {
          int v = -1;
          if (c == handle::kGroupSrcRank) v = src;
          else if (c == handle::kGroupSrcToken) v = tok;
          else if (c == handle::kGroupCombineSlot) v = cslot;
          hrow[c] = v;
        }
        __syncwarp();
        if (j >= 0) hrow[handle::kGroupMember + members_before] = erow;
        for (unsigned rest = local; rest != 0; rest &= rest - 1) {
          const int k = __ffs(rest) - 1;
          const int r = __shfl_sync(0xffffffffu, erow, k);
          const int jk = __shfl_sync(0xffffffffu, j, k);
          const float wk = __shfl_sync(0xffffffffu, wgt, k);
          if (copy) {
            warp_copy(p.recv_x + static_cast<int64_t>(r) * p.x_bytes, wx, p.x_bytes);
            if (p.s_bytes > 0) warp_copy(p.recv_s + static_cast<int64_t>(r) * p.s_bytes, ws, p.s_bytes);
          }
          if (lane == 0) {
            idx32[r] = jk;
            p.recv_w[r] = wk;
            int* rrow = recv_h + static_cast<int64_t>(r) * W;
            rrow[handle::kRecvSrcRank] = src;
            rrow[handle::kRecvSrcToken] = tok;
            rrow[handle::kRecvTopkSlot] = k;
            rrow[handle::kRecvGroup] = i;
          }
        }
      }
    } else {
      // ---- no group i ----
      if (!p.expand) {
        warp_zero(p.recv_x + static_cast<int64_t>(i) * p.x_bytes, p.x_bytes);
        if (p.s_bytes > 0) warp_zero(p.recv_s + static_cast<int64_t>(i) * p.s_bytes, p.s_bytes);
        if (lane < K) {
          idx64[static_cast<int64_t>(i) * K + lane] = -1;
          p.recv_w[static_cast<int64_t>(i) * K + lane] = 0.f;
        }
        warp_fill_i32(hrow, W, -1);
      } else {
        warp_fill_i32(hrow + 4, W - 4, -1);
      }
    }
    if (p.expand && !expand_row_valid(tpe, bstart, p.E_loc, i)) {
      // ---- expert-major padding row i ----
      warp_zero(p.recv_x + static_cast<int64_t>(i) * p.x_bytes, p.x_bytes);
      if (p.s_bytes > 0) warp_zero(p.recv_s + static_cast<int64_t>(i) * p.s_bytes, p.s_bytes);
      if (lane == 0) {
        idx32[i] = -1;
        p.recv_w[i] = 0.f;
      }
      if (lane <= handle::kRecvGroup) hrow[lane] = -1;  // per-row columns
    }
  }
}

}  // namespace

cudaError_t launch_dispatch_push(const PushParams& p, int ctas, cudaStream_t stream) {
  return launch_pdl(dispatch_push_kernel, ctas, 512, 0, stream, p);
}

cudaError_t launch_dispatch_epilogue(const EpilogueParams& p, int ctas, cudaStream_t stream) {
  return launch_pdl(dispatch_epilogue_kernel, ctas, 512, 0, stream, p);
}

}  // namespace deep_ep_ops
