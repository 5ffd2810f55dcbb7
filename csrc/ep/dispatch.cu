// Dispatch, phases 2 and 3.
//
// push: one warp per token (each warp's first token fixed, the rest by ticket, so a CTA that
// starts late does not hold a share of its own). It adds the count kernel's three terms into
// the token's final rows (compact row at each destination rank, expert-major row of each slot),
// writes the handle's header and send part, and writes the token's row, scale packs and a
// metadata row straight into every other destination rank's window at the token's compact row
// (so the receive order (source rank, source token) holds by construction). Rows for this rank
// itself skip the window: the push writes them straight into this rank's outputs (every
// expert-major row of the token here, once loaded), with their routing tensors and handle
// receive rows. A token goes to each destination rank once, however many of its experts live
// there; in the compact layout its row is read once and stored to all its destination ranks.
// Ends with a per-CTA barrier. A compact push with peers starts as soon as the layout's last
// CTA has the compact bases (DispatchScratch::bases_ready), not when the layout kernel ends.
// With one rank nothing crosses a window: no barrier, and the push also does the epilogue's
// remaining work (rows that carry no token), so dispatch is two kernels.
//
// epilogue: local only. Copies the window rows of the other ranks into fresh outputs
// (expanding compact rows into expert-major rows when asked) with their handle receive rows,
// and fills every row that carries no token (padding is always zero).
//
// Direct outputs: when this rank's recv_x / recv_scales sit in a direct-output slot of its
// window (it says so with its count row), the other ranks' pushes write their rows of x and
// scales straight into them, at the same rows the epilogue would have used; the epilogue then
// writes only the routing tensors and handle rows. Each destination decides for itself, so a
// push may write one destination directly and stage for another.
//
// Bulk fan-out (DEEP_EP_OPS_BULK_COPY=1, compact rows, R >= 2, 16-byte rows; an experiment,
// within the spread of the register copies at R = 2, bench/NOTES.md v12): each warp loads its
// next token's row and scales into its shared buffer by bulk copies as soon as the previous
// row's stores are issued (the first one before the PDL wait), so the load flies while the warp
// works out rows and metadata; then every destination lane stores the buffer out by bulk
// stores.
#include "ep_barrier.cuh"
#include "../device/bulk_copy.cuh"
#include "../host/cuda_check.hpp"
#include "topk_loads.cuh"
#include "fill_rows.cuh"
#include "handle_rows.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

constexpr int kPushThreads = 512;
static_assert(kPushThreads / kWarp == kBulkWarps, "one bulk row buffer per push warp");

// kBulk: the bulk fan-out (its own instantiation, so the default one keeps its registers).
template <bool kBulk>
__global__ void __launch_bounds__(kPushThreads, 1) dispatch_push_kernel(PushParams p) {
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  extern __shared__ __align__(128) char push_rows[];  // bulk fan-out: one row buffer per warp
  __shared__ unsigned long long row_loaded[kPushThreads / kWarp];
  __shared__ unsigned long long rows_done_ns;  // latest warp to finish its tokens (profiling)
  // (stamps are stored at once: none stays in a register across the token loop)
  unsigned long long* stamp = p.s.push_times + static_cast<int64_t>(blockIdx.x) * kPushStamps;
  if (threadIdx.x == 0 && !p.local_only) stamp[0] = global_ns();
  // Before waiting for the layout kernel: pull this warp's first rows of x into L2. x is not
  // the layout's output but its predecessor's, and this grid only starts once every layout
  // CTA has passed its own pdl_wait(), i.e. once x's producer has completed; the copies below
  // then mostly read L2 while the layout's latency-bound work runs.
  if (lane == 0 && p.prefetch) {
    int n = 0;
    for (int t = blockIdx.x * warps + warp_id(); t < p.io.T && n < 2; t += gridDim.x * warps, ++n) {
      prefetch_l2(p.io.x + static_cast<int64_t>(t) * p.io.x_bytes, p.io.x_bytes);
      if (p.io.s_bytes > 0) prefetch_l2(p.io.scales + static_cast<int64_t>(t) * p.io.s_bytes, p.io.s_bytes);
    }
  }
  // Bulk fan-out: the warp's first row starts loading into its buffer before the wait too (for
  // the same reason); each later row starts as soon as the previous one's stores are issued.
  const unsigned xb = static_cast<unsigned>(p.io.x_bytes), sb = static_cast<unsigned>(p.io.s_bytes);
  WarpBulkFanout fan{smem_u32(push_rows) + static_cast<unsigned>(warp_id() * p.bulk_row_bytes),
                     smem_u32(&row_loaded[warp_id()]), 0u};
  const auto load_row = [&](int t) {
    if (t < p.io.T)
      fan.load(p.io.x + static_cast<int64_t>(t) * p.io.x_bytes, xb,
               p.io.scales + static_cast<int64_t>(t) * p.io.s_bytes, sb);
  };
  if constexpr (kBulk) {
#if DEEP_EP_OPS_HAS_BULK_COPY
    if (lane == 0) mbar_init_single(fan.bar);
#endif
    __syncwarp();
    load_row(blockIdx.x * warps + warp_id());
  }
  // A compact push with peers starts once the layout's last CTA has the compact bases (the
  // layout's per-expert work and its end come later; the push waits for them before it ends,
  // so what follows still sees a finished layout). Everything else waits for the layout's end.
  const bool early = !p.local_only && !p.expand;
  __shared__ int bases_ok;
  if (early) {
    if (threadIdx.x == 0)
      bases_ok = timed_wait(p.s.bases_ready, [](uint32_t v) { return v != 0u; }, p.comm.wait,
                            kOpDispatchLayout, kLayoutSlot, p.comm.rank, 1u);
  } else {
    pdl_wait();
    if (threadIdx.x == 0) bases_ok = 1;
  }
  __syncthreads();
  pdl_trigger();
  if (threadIdx.x == 0) {
    rows_done_ns = 0;
    if (!p.local_only) stamp[1] = global_ns();
  }
  const int R = p.comm.num_ranks, K = p.io.K, me = p.comm.rank, E = p.io.E, NC = E + R, W = p.io.W;
  int* recv_h = p.io.handle + static_cast<int64_t>(handle::kHeaderRows + p.io.T) * W;
  // Where each destination wants its rows of x and scales (its layout kernel published them
  // before the count barrier, which the bases follow): a direct-output slot of its window, or
  // -1: this rank's staging rows in its window.
  __shared__ long long out_x_at[kMaxRanks], out_s_at[kMaxRanks];
  if (!p.local_only)
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      const long long* outs =
          reinterpret_cast<const long long*>(peer_ptr(p.comm, me) + p.comm.outs_off) + 2 * d;
      out_x_at[d] = __ldcg(outs);
      out_s_at[d] = __ldcg(outs + 1);
    }
  __syncthreads();
  // Each warp's first token is fixed (its row may be in flight already); later ones come from
  // the ticket when rows cross windows, since a CTA whose SM is taken by another process can
  // start tens of microseconds late and would otherwise hold its fixed share (and its peers'
  // barrier) that long. With one rank the fixed stride (no ticket to reset).
  const int first_round = gridDim.x * warps;
  const auto next_token = [&](int t) {
    return p.local_only ? t + first_round : warp_next_ticket(p.s.push_ticket, first_round);
  };
  // (a failed wait for the bases: no rows; the barrier below then fails fast as well)
  for (int t = bases_ok ? blockIdx.x * warps + warp_id() : p.io.T; t < p.io.T;) {
    const unsigned dmask = p.s.tok_dmask[t];
    const int64_t tk = static_cast<int64_t>(t) * K + lane;
    int e;
    float wgt;
    load_slot(p.io, t, e, wgt);
    // final rows of slot `lane`: base + this count-CTA's prefix + rank inside the count-CTA
    const int edst = e >= 0 ? e / p.E_loc : -1;
    int erow = -1, crow = -1;
    if (e >= 0) {
      const int* pre = p.s.cta_prefix + static_cast<int64_t>(t / p.cta_tokens) * NC;
      const int rk = p.s.tok_rank[tk];
      // (compact rows need no expert-major row: ebase may not be written yet, see `early`)
      if (p.expand) erow = p.s.ebase[e] + pre[e] + (rk >> 16);
      crow = p.s.cbase[edst] + pre[E + edst] + (rk & 0xffff);
    }
    warp_write_send_row(p.io.handle + static_cast<int64_t>(handle::kHeaderRows + t) * W, W, K,
                        __popc(dmask), edst, p.expand ? erow : crow);
    const char* xrow = p.io.x + static_cast<int64_t>(t) * p.io.x_bytes;
    const char* srow = p.io.scales + static_cast<int64_t>(t) * p.io.s_bytes;
    // compact layout: lane i < nd gets the i-th destination's row of x and of scales; the
    // row is then read once and stored to all of them (warp_copy_fanout)
    char *xd = nullptr, *sd = nullptr;
    int nd = 0;
    const auto fan_out_to = [&](char* x_at, char* s_at) {
      if (lane == nd) {
        xd = x_at;
        sd = s_at;
      }
      ++nd;
    };
    for (unsigned rest = dmask; rest != 0; rest &= rest - 1) {
      const int d = __ffs(rest) - 1;
      const unsigned at_d = __ballot_sync(0xffffffffu, edst == d);  // nonzero: d is in dmask
      const int row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1);  // compact row at d
      const int cslot = __popc(dmask & ((1u << d) - 1u));
      if (d == me) {
        // straight into this rank's outputs, with the routing tensors and handle rows the
        // epilogue writes for the other ranks' tokens
        const bool here = edst == me;
        const int j = here ? e - me * p.E_loc : -1;  // local expert of slot `lane`
        int* grow = recv_h + static_cast<int64_t>(row) * W;  // group `row`
        if (!p.expand) {
          fan_out_to(p.io.recv_x + static_cast<int64_t>(row) * p.io.x_bytes,
                     p.io.recv_s + static_cast<int64_t>(row) * p.io.s_bytes);
          if (lane < K) {
            static_cast<int64_t*>(p.io.recv_idx)[static_cast<int64_t>(row) * K + lane] = j;
            p.io.recv_w[static_cast<int64_t>(row) * K + lane] = here ? wgt : 0.f;
          }
          warp_write_compact_recv_row(grow, W, me, t, row, cslot);
        } else {
          warp_copy_rows(p.io.recv_x, erow, at_d, xrow, p.io.x_bytes);
          if (p.io.s_bytes > 0) warp_copy_rows(p.io.recv_s, erow, at_d, srow, p.io.s_bytes);
          warp_write_expand_group(recv_h, W, K, row, me, t, cslot, j, erow, wgt,
                                  static_cast<int*>(p.io.recv_idx), p.io.recv_w);
        }
        continue;
      }
      char* base = peer_ptr(p.comm, d);
      int* meta = reinterpret_cast<int*>(base + p.rows.m_off) + static_cast<int64_t>(row) * p.rows.meta_ints;
      const long long ox = out_x_at[d], os = out_s_at[d];
      if (lane == 0) {
        meta[0] = me;
        meta[1] = t;
        meta[2] = cslot;
        meta[3] = 0;
      }
      if (lane < K) {
        const bool here = edst == d;
        meta[4 + lane] = here ? e - d * p.E_loc : -1;
        meta[4 + K + lane] = here ? erow : -1;
        meta[4 + 2 * K + lane] = here ? __float_as_int(wgt) : 0;
      }
      if (ox < 0) {  // staged: the destination's epilogue copies the rows out
        char* wx = base + p.rows.x_off + static_cast<int64_t>(row) * p.rows.x_stride;
        char* ws = base + p.rows.s_off + static_cast<int64_t>(row) * p.rows.s_stride;
        if (!p.expand) {
          fan_out_to(wx, ws);
        } else {
          warp_copy(wx, xrow, p.io.x_bytes);
          if (p.io.s_bytes > 0) warp_copy(ws, srow, p.io.s_bytes);
        }
      } else if (!p.expand) {  // straight into the destination's recv_x / recv_scales
        fan_out_to(base + ox + static_cast<int64_t>(row) * p.io.x_bytes,
                   base + os + static_cast<int64_t>(row) * p.io.s_bytes);
      } else {  // every expert-major row of the token there
        warp_copy_rows(base + ox, erow, at_d, xrow, p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy_rows(base + os, erow, at_d, srow, p.io.s_bytes);
      }
    }
    const unsigned to = nd >= kWarp ? 0xffffffffu : (1u << nd) - 1u;  // lanes [0, nd)
    // a destination row off 16 bytes (a peer's direct-output slot) takes the register copy
    const bool bulk_here =
        kBulk && nd > 0 &&
        __ballot_sync(0xffffffffu, lane < nd && ((reinterpret_cast<uintptr_t>(xd) |
                                                  reinterpret_cast<uintptr_t>(sd)) & 15u)) == 0;
    if (bulk_here) {
      fan.store(to, xd, xb, sd, sb, p.comm.wait.timeout_ns);
    } else {
      if (kBulk) fan.skip(p.comm.wait.timeout_ns);
      if (nd > 0) {
        warp_copy_fanout(xd, to, xrow, p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy_fanout(sd, to, srow, p.io.s_bytes);
      }
    }
    t = next_token(t);
    if constexpr (kBulk) load_row(t);
  }
  if constexpr (kBulk) fan.drain();
  if (lane == 0) atomicMax(&rows_done_ns, global_ns());
  if (early) pdl_wait();  // the layout's end (the header row, and for the epilogue recv_info)
  if (blockIdx.x == 0)  // handle header row
    for (int c = threadIdx.x; c < W; c += blockDim.x) p.io.handle[c] = p.s.send_handle[c];
  if (p.local_only) {
    FillArgs a{p.s.recv_info, p.io.recv_x, p.io.recv_s, p.io.recv_idx, p.io.recv_w, p.io.tpe, recv_h,
               p.io.x_bytes, p.io.s_bytes, p.io.C, K, W, p.E_loc, p.expand};
    fill_empty_rows(a);
    return;
  }
  cta_barrier(p.comm, blockIdx.x, kOpDispatchPush);
  if (threadIdx.x == 0) {  // (rows_done_ns: every warp added it before the barrier's __syncthreads)
    stamp[2] = rows_done_ns;
    stamp[3] = global_ns();
  }
}

__global__ void __launch_bounds__(512) dispatch_epilogue_kernel(EpilogueParams p) {
  pdl_wait();
  pdl_trigger();
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.kernel_times[kEpilogueStart] = global_ns();
    *p.bases_ready = 0u;  // the push is done with it (see DispatchScratch::bases_ready)
  }
  const int K = p.io.K, W = p.io.W;
  const int G = p.recv_info[kRecvG];
  const int local_lo = p.recv_info[recv_local_lo(p.E_loc)];
  const int local_n = p.recv_info[recv_local_n(p.E_loc)];
  const int lane = lane_id();
  const int warps = blockDim.x / kWarp;
  const int gwarp = blockIdx.x * warps + warp_id();
  const int nwarps = gridDim.x * warps;

  int* recv_h = p.io.handle + static_cast<int64_t>(handle::kHeaderRows + p.io.T) * W;
  int64_t* idx64 = static_cast<int64_t*>(p.io.recv_idx);
  int* idx32 = static_cast<int*>(p.io.recv_idx);
  // groups from the other ranks: [0, G) without this rank's own [local_lo, local_lo + local_n)
  for (int q = gwarp; q < G - local_n; q += nwarps) {
    const int i = q < local_lo ? q : q + local_n;
    int* hrow = recv_h + static_cast<int64_t>(i) * W;
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
    if (!p.expand) {
      if (!p.direct) {
        warp_copy(p.io.recv_x + static_cast<int64_t>(i) * p.io.x_bytes, wx, p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy(p.io.recv_s + static_cast<int64_t>(i) * p.io.s_bytes, ws, p.io.s_bytes);
      }
      if (lane < K) {
        idx64[static_cast<int64_t>(i) * K + lane] = j;
        p.io.recv_w[static_cast<int64_t>(i) * K + lane] = wgt;
      }
      warp_write_compact_recv_row(hrow, W, src, tok, i, cslot);
    } else {
      const unsigned local = __ballot_sync(0xffffffffu, j >= 0);
      warp_write_expand_group(recv_h, W, K, i, src, tok, cslot, j, erow, wgt, idx32, p.io.recv_w);
      if (!p.direct) {
        warp_copy_rows(p.io.recv_x, erow, local, wx, p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy_rows(p.io.recv_s, erow, local, ws, p.io.s_bytes);
      }
    }
  }
  FillArgs a{p.recv_info, p.io.recv_x, p.io.recv_s, p.io.recv_idx, p.io.recv_w, p.io.tpe, recv_h,
             p.io.x_bytes, p.io.s_bytes, p.io.C, K, W, p.E_loc, p.expand};
  fill_empty_rows(a);
  // the clock only grows, so the latest CTA's end wins without a reset between calls
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(p.kernel_times + kEpilogueEnd, global_ns());
}

}  // namespace

cudaError_t launch_dispatch_push(const PushParams& p, int ctas, cudaStream_t stream) {
  if (p.bulk_row_bytes == 0) return launch_pdl(dispatch_push_kernel<false>, ctas, kPushThreads, 0, stream, p);
  static const int room =
      raise_dynamic_smem_limit(reinterpret_cast<const void*>(dispatch_push_kernel<true>));
  const int smem = p.bulk_row_bytes * kBulkWarps;
  if (smem > room) return cudaErrorInvalidValue;  // bulk_row_limit() promised what is not there
  return launch_pdl(dispatch_push_kernel<true>, ctas, kPushThreads, smem, stream, p);
}

cudaError_t launch_dispatch_epilogue(const EpilogueParams& p, int ctas, cudaStream_t stream) {
  return launch_pdl(dispatch_epilogue_kernel, ctas, 512, 0, stream, p);
}

}  // namespace deep_ep_ops
