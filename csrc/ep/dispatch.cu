// Dispatch, phases 2 and 3 (phase 1, the count: layout.cu, or inside the push when fused).
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
// Ends with a per-CTA barrier. A compact push with peers starts as soon as every count block of
// this rank and of the lower ranks has announced its tokens to each rank (the pipelined loop
// with its bases table: EpWindow [blocks]; it sums its compact bases itself), or else once the
// layout's last CTA has scanned the count blocks (DispatchScratch::bases_ready) and the lower
// ranks' token counts are in; not when the layout kernel ends.
// Under block routing (the pipelined loop's usual case) the layout's count CTAs write the
// handle's send rows and every compact routing row but the metadata rows (block_routing.cuh),
// and the push moves only the rows of x and the scales.
// With one rank nothing crosses a window: no barrier, and the push also does the epilogue's
// remaining work (rows that carry no token), so dispatch is two kernels.
//
// epilogue: local only. Copies the window rows of the other ranks into fresh outputs
// (expanding compact rows into expert-major rows when asked) with their handle receive rows,
// and fills every row that carries no token (padding is always zero).
//
// Direct outputs: when this rank's recv_x / recv_scales sit in a direct-output slot of its
// window (it says so as its layout kernel starts), the other ranks' pushes write their rows of
// x and scales straight into them, at the same rows the epilogue would have used. Compact
// outputs bring their routing tensors and handle into the slot too (SlotRouting): the pushes
// write those rows as well, instead of metadata rows, and no epilogue runs; the push's last CTA
// ends the call. Expert-major outputs keep an epilogue that writes only the routing tensors and
// handle rows. Each destination decides for itself, so a push may write one destination
// directly and stage for another.
//
// Two push loops: the pipelined one (compact rows with peers, rows and scale packs at 16-byte
// multiples and addresses: the usual FP8 / BF16 dispatch) stages each token's row in shared
// memory while it works out the token's rows and the next token, 24 warps per CTA; the general
// one (everything else: expert-major rows, one rank, odd sizes, the bulk fan-out) holds rows in
// registers. Both share the prologue (wait for the bases), the per-destination writes and the
// end (header row, barrier).
//
// Bulk fan-out (DEEP_EP_OPS_BULK_COPY=1, compact rows, R >= 2, 16-byte rows; an experiment,
// within the spread of the register copies at R = 2, bench/NOTES.md v12): each warp loads its
// next token's row and scales into its shared buffer by bulk copies as soon as the previous
// row's stores are issued (the first one before the PDL wait), so the load flies while the warp
// works out rows and metadata; then every destination lane stores the buffer out by bulk
// stores.
#include <array>
#include <iterator>

#include "layout_phases.cuh"
#include "../device/bulk_copy.cuh"
#include "../host/cuda_check.hpp"
#include "fill_rows.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

constexpr int kPushThreads = 512;
static_assert(kPushThreads / kWarp == kBulkWarps, "one bulk row buffer per push warp");

// What both push loops share before their tokens: the profiling stamp, the L2 pulls of each
// warp's first rows, the wait for what the rows need (the compact bases, or the layout's end),
// and where each destination wants its rows; this first part runs before the wait (the fused
// push: after its own PDL wait, since it has no layout kernel before it).
__device__ void push_prologue(const PushParams& p, unsigned long long* stamp) {
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
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
}

// p.block_words: the compact bases from the count blocks' own words (layout_phases.cuh
// announce_block_words) rather than from the publisher, which scans after the last block's
// ticket and only then raises its flag and sends the token counts: warp 1 + i waits for source
// rank s = i (i <= this rank; a lower rank's block 0 says how many blocks it counted); the
// lower ranks' blocks add up to cbase[d] (shared [R], zeroed), this rank's go into table[b * R
// + d] (shared, the pipelined loop's base table; the caller turns them into bases). false
// after a failed wait. Every thread of the CTA.
__device__ bool wait_block_words(const PushParams& p, uint32_t epoch, int* cbase, int* table) {
  const int R = p.comm.num_ranks, me = p.comm.rank, lane = lane_id();
  const int helpers = blockDim.x / kWarp - 1;  // (warp 0 waits for the entries)
  bool ok = true;
  for (int s = warp_id() - 1; s >= 0 && s <= me; s += helpers) {
    int blocks = count_blocks(p.io.T, p.cta_tokens);
    long long first = 0;  // lane d < R: block 0's word to d (a lower rank)
    if (s < me) {
      if (lane < R)
        first = wait_epoch_word(block_word(p.comm, me, s, 0, lane), epoch, p.comm.wait,
                                kOpDispatchLayout, kLayoutSlot, s);
      if (__any_sync(0xffffffffu, first < 0)) {
        ok = false;
        continue;
      }
      blocks = __shfl_sync(0xffffffffu, block_word_blocks(first), 0);
    }
    for (int j = lane; j < blocks * R; j += kWarp) {
      const int b = j / R, d = j % R;  // (b == 0 of a lower rank: j == lane == d, seen above)
      const long long v = s < me && b == 0
                              ? first
                              : wait_epoch_word(block_word(p.comm, me, s, b, d), epoch,
                                                p.comm.wait, kOpDispatchLayout, kLayoutSlot, s);
      if (v < 0) {
        ok = false;
        break;
      }
      const int n = block_word_tokens(v);
      if (s < me) atomicAdd(&cbase[d], n);  // integer sums: any order
      else table[j] = n;
    }
  }
  return ok;
}

// Where this rank's compact rows of count block b start at destination d (layout_phases.cuh):
// the base of this rank's rows there (cbase: push_wait_for_rows) + the block's prefix, which
// the layout's publisher wrote while this kernel may run: read past L1.
__device__ __forceinline__ int compact_block_base(const PushParams& p, const int* cbase, int b, int d) {
  const int NC = p.io.E + p.comm.num_ranks;
  return cbase[d] + ld_cg(p.s.cta_prefix + static_cast<int64_t>(b) * NC + p.io.E + d);
}

// Token t's compact row at destination d: its block's base + t's rank inside that block
// (`rank`: its tok_rank).
__device__ __forceinline__ int compact_row_of(const PushParams& p, const int* cbase, int t, int d,
                                              int rank) {
  return compact_block_base(p, cbase, t / p.cta_tokens, d) + tok_rank_in_block(rank);
}

// Where each destination wants this rank's compact rows (EpWindow [outs], as its layout
// announced them): x and scales in its direct-output slot, or -1: this rank's staging rows in
// its window; its routing outputs there too (SlotRouting's offset), or -1: a metadata row.
struct PeerOutputs {
  long long x[kMaxRanks], s[kMaxRanks], r[kMaxRanks];
};

// The wait half of the prologue (after the bulk fan-out's first load is in flight). Returns
// whether the waits succeeded (a failed one: no rows; the barrier at the end then fails fast as
// well). Every thread must call it. outs: shared, filled here for each destination; cbase:
// shared [R], the compact row of this rank's first token at each destination; ok: a shared
// int; table: the pipelined loop's base table (shared [blocks][R], p.base_table ints), filled
// here with every count block's compact base at every destination (nullptr: the general loop).
__device__ bool push_wait_for_rows(const PushParams& p, unsigned long long* stamp,
                                   PeerOutputs& outs, int* cbase, int* ok, int* table) {
  // A compact push with peers starts once its count blocks' words are in (p.block_words), or
  // this rank's layout has scanned its count blocks (bases_ready) and the lower ranks' token
  // counts are in (the layout's per-expert work and its end come later; the push waits for
  // them before it ends, so what follows still sees a finished layout). Everything else waits
  // for the layout's end first.
  const int R = p.comm.num_ranks, me = p.comm.rank;
  if (p.local_only || p.expand) pdl_wait();
  if (threadIdx.x == 0) *ok = 1;
  if (threadIdx.x < R) cbase[threadIdx.x] = 0;
  __syncthreads();
  // All at once, each by its own thread: this rank's scan (bases_ready, warp 0's lane 0), the
  // lower ranks' token counts to d (warp 1's lane d; none with one rank) and every peer's entry,
  // after which its output places (read below) are published and its window may be written
  // (warp 2's lane `peer`); with p.block_words the blocks' words (warps 1 and up) and the
  // entries (warp 0). The epoch needs no flag: no kernel of this call stores it.
  const uint32_t epoch = p.local_only ? 0u : layout_epoch(p.comm.epochs);
  const int lane = lane_id();
  const int entry_warp = p.block_words ? 0 : 2;
  if (p.block_words) {
    if (!wait_block_words(p, epoch, cbase, table)) *ok = 0;
  } else if (!p.local_only && threadIdx.x == 0 &&
             !timed_wait(p.s.bases_ready, [epoch](uint32_t v) { return v == epoch; }, p.comm.wait,
                         kOpDispatchLayout, kLayoutSlot, me, epoch)) {
    *ok = 0;
  }
  if (!p.block_words && warp_id() == 1 && lane < R) {
    int below = 0;
    for (int s = 0; s < me; ++s) {
      const long long n = wait_epoch_word(tokens_word(p.comm, me, s, lane), epoch, p.comm.wait,
                                          kOpDispatchLayout, kLayoutSlot, s);
      if (n < 0) *ok = 0;
      below += static_cast<int>(n);
    }
    cbase[lane] = below;
  }
  if (!p.local_only && warp_id() == entry_warp && lane < R && lane != me &&
      !wait_epoch(flag_ptr(peer_ptr(p.comm, me), p.comm, kEnterSlot, lane), epoch, p.comm.wait,
                  kOpDispatchLayout, kEnterSlot, lane))
    *ok = 0;
  __syncthreads();
  pdl_trigger();
  if (threadIdx.x == 0 && !p.local_only) stamp[1] = global_ns();
  if (p.block_words) {  // this rank's blocks' counts -> their compact bases, per destination
    const int blocks = count_blocks(p.io.T, p.cta_tokens);
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      int run = cbase[d];
      for (int b = 0; b < blocks; ++b) {
        const int n = table[b * R + d];
        table[b * R + d] = run;
        run += n;
      }
    }
  } else if (table != nullptr) {  // from the publisher's scan
    for (int i = threadIdx.x; i < p.base_table; i += blockDim.x)
      table[i] = compact_block_base(p, cbase, i / R, i % R);
  }
  if (!p.local_only)
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      const long long* at = reinterpret_cast<const long long*>(peer_ptr(p.comm, me) + p.comm.outs_off) +
                            kOutsPerRank * d;
      outs.x[d] = __ldcg(at);
      outs.s[d] = __ldcg(at + 1);
      outs.r[d] = __ldcg(at + 2);
    }
  __syncthreads();
  return *ok != 0;
}

// What ends a dispatch with more than one rank, once every kernel of the call is done with
// them: the tickets and bases_ready back to 0, and the call's layout epoch stored (the next
// call's kernels count on from it). One thread: the epilogue's first, or that of the push's last
// CTA to finish its tokens when no epilogue follows (PushParams::ends_call).
__device__ __forceinline__ void end_dispatch_call(const DispatchScratch& s, unsigned* epochs) {
  *s.bases_ready = 0u;
  *s.push_ticket = 0u;
  *s.count_ticket = 0u;
  epochs[kLayoutSlot] = layout_epoch(epochs);
}

// What both push loops do after their tokens: the handle's header row, then with one rank the
// rows that carry no token, with more the barrier with the peers and the profiling stamps.
__device__ void push_finish(const PushParams& p, unsigned long long* stamp,
                            const unsigned long long* rows_done_ns) {
  if (!p.local_only && !p.expand) pdl_wait();  // the layout's end (the header row, recv_info)
  if (p.ends_call) {
    // Every warp of the CTA is done with the tickets and the layout epoch, and so is the layout
    // kernel (the wait above): the CTA counts itself out, and the last one ends the call. Warp
    // 1 does it, so the atomic's round trip runs beside warp 0's barrier, not before it.
    __syncthreads();
    if (threadIdx.x == kWarp) {
      __threadfence();  // (this CTA's ticket atomics before its exit)
      if (atomicAdd(p.s.push_exits, 1u) == gridDim.x - 1) {
        *p.s.push_exits = 0u;
        p.s.kernel_times[kEpilogueStart] = p.s.kernel_times[kEpilogueEnd] = 0ull;
        end_dispatch_call(p.s, p.comm.epochs);
      }
    }
  }
  const int W = p.io.W, K = p.io.K;
  if (blockIdx.x == 0 && !p.fused)  // handle header row (the fused push's publisher wrote it)
    for (int c = threadIdx.x; c < W; c += blockDim.x) p.io.handle[c] = p.s.send_handle[c];
  // the rows that carry no token and tokens_per_expert: they need only the layout's results,
  // and nobody else writes them, so no barrier keeps them from the epilogue's path
  int* recv_h = handle_row(p.io.handle, p.io.T, W);
  FillArgs a{p.s.recv_info, p.io.recv_x, p.io.recv_s, p.io.recv_idx, p.io.recv_w, p.io.tpe, recv_h,
             p.io.x_bytes, p.io.s_bytes, p.io.C, K, W, p.E_loc, p.expand};
  fill_empty_rows(a);
  if (p.local_only) return;
  cta_barrier(p.comm, blockIdx.x, kOpDispatchPush);
  if (threadIdx.x == 0) {  // (rows_done_ns: every warp added it before the barrier's __syncthreads)
    stamp[2] = *rows_done_ns;
    stamp[3] = global_ns();
  }
}

// The metadata row of token t at compact row `row` of peer d's window: source rank and token,
// combine slot, then per slot k (lane k < K) the local expert at d, its expert-major row there
// and its weight (-1 / 0 for slots elsewhere). The destination's epilogue builds its routing
// tensors and handle rows from it.
__device__ __forceinline__ void write_meta_row(const PushParams& p, char* base, int d, int row,
                                               int t, int cslot, int e, int erow, float wgt) {
  const int lane = lane_id(), K = p.io.K;
  int* meta = reinterpret_cast<int*>(base + p.rows.m_off) + static_cast<int64_t>(row) * p.rows.meta_ints;
  if (lane == 0) *reinterpret_cast<int4*>(meta) = make_int4(p.comm.rank, t, cslot, 0);  // 16-byte rows
  if (lane < K) {
    const bool here = e >= 0 && e / p.E_loc == d;
    meta[4 + lane] = here ? e - d * p.E_loc : -1;
    meta[4 + K + lane] = here ? erow : -1;
    meta[4 + 2 * K + lane] = here ? __float_as_int(wgt) : 0;
  }
}

// Compact row `row` of token t at destination d, written by this rank into `to`: this rank's
// own outputs, or d's direct-output slot. The epilogue writes them from metadata rows for the
// others.
__device__ __forceinline__ void write_compact_routing(const PushParams& p, int d, int row, int t,
                                                      int cslot, int e, float wgt,
                                                      const RoutingRows& to) {
  const int lane = lane_id(), K = p.io.K;
  const bool here = e >= 0 && e / p.E_loc == d;
  if (lane < K) {
    to.idx[static_cast<int64_t>(row) * K + lane] = here ? e - d * p.E_loc : -1;
    to.w[static_cast<int64_t>(row) * K + lane] = here ? wgt : 0.f;
  }
  warp_write_compact_recv_row(to.recv_h + static_cast<int64_t>(row) * p.io.W, p.io.W, p.comm.rank,
                              t, row, cslot);
}

// Where a compact row goes at destination d: this rank's outputs, the destination's
// direct-output slot, or this rank's staging rows in its window.
__device__ __forceinline__ void compact_row_dst(const PushParams& p, int d, int row,
                                                const PeerOutputs& outs, char*& x_at, char*& s_at) {
  if (d == p.comm.rank) {
    x_at = p.io.recv_x + static_cast<int64_t>(row) * p.io.x_bytes;
    s_at = p.io.recv_s + static_cast<int64_t>(row) * p.io.s_bytes;
    return;
  }
  char* base = peer_ptr(p.comm, d);
  const long long ox = outs.x[d], os = outs.s[d];
  if (ox < 0) {
    x_at = base + p.rows.x_off + static_cast<int64_t>(row) * p.rows.x_stride;
    s_at = base + p.rows.s_off + static_cast<int64_t>(row) * p.rows.s_stride;
  } else {
    x_at = base + ox + static_cast<int64_t>(row) * p.io.x_bytes;
    s_at = base + os + static_cast<int64_t>(row) * p.io.s_bytes;
  }
}

// Compact layout, destination d of token t at compact row `row`: the row's routing, as far as
// `routing` asks (bit 0: this rank's routing tensors and handle row; for another d, bit 2: its
// rows in its direct-output slot when it has one there, else bit 1: the metadata row in d's
// window; the count blocks write the others under block routing, timing experiments skip
// some), then lane nd (the warp's count of destinations so far) takes where the row's x and
// scales go, and nd grows by one.
__device__ __forceinline__ void compact_destination(const PushParams& p, int d, int row, int t,
                                                    int cslot, int e, float wgt,
                                                    const PeerOutputs& outs, int routing, int& nd,
                                                    char*& xd, char*& sd) {
  if (d == p.comm.rank) {
    if (routing & 1) {
      int* recv_h = handle_row(p.io.handle, p.io.T, p.io.W);
      write_compact_routing(p, d, row, t, cslot, e, wgt,
                            {static_cast<int64_t*>(p.io.recv_idx), p.io.recv_w, recv_h});
    }
  } else if (outs.r[d] >= 0) {
    if (routing & 4) {
      char* base = peer_ptr(p.comm, d);
      const SlotRouting at = SlotRouting::at(outs.r[d], p.io.C, p.io.K, p.io.W);
      write_compact_routing(p, d, row, t, cslot, e, wgt, at.rows_in(base));
    }
  } else if (routing & 2) {
    write_meta_row(p, peer_ptr(p.comm, d), d, row, t, cslot, e, -1, wgt);
  }
  char *x_at, *s_at;
  compact_row_dst(p, d, row, outs, x_at, s_at);
  if (lane_id() == nd) {
    xd = x_at;
    sd = s_at;
  }
  ++nd;
}

// kBulk: the bulk fan-out (its own instantiation, so the default one keeps its registers).
template <bool kBulk>
__global__ void __launch_bounds__(kPushThreads, 1) dispatch_push_kernel(PushParams p) {
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  extern __shared__ __align__(128) char push_rows[];  // bulk fan-out: one row buffer per warp
  __shared__ unsigned long long row_loaded[kPushThreads / kWarp];
  __shared__ unsigned long long rows_done_ns;  // latest warp to finish its tokens (profiling)
  __shared__ PeerOutputs outs;
  __shared__ int cbase[kMaxRanks], bases_ok;
  // (stamps are stored at once: none stays in a register across the token loop)
  unsigned long long* stamp = p.s.push_times + static_cast<int64_t>(blockIdx.x) * kPushStamps;
  push_prologue(p, stamp);
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
  if (threadIdx.x == 0) rows_done_ns = 0;
  const bool ok = push_wait_for_rows(p, stamp, outs, cbase, &bases_ok, nullptr);
  const int R = p.comm.num_ranks, K = p.io.K, me = p.comm.rank, E = p.io.E, NC = E + R, W = p.io.W;
  int* recv_h = handle_row(p.io.handle, p.io.T, W);
  // Each warp's first token is fixed (its row may be in flight already); later ones come from
  // the ticket when rows cross windows, since a CTA whose SM is taken by another process can
  // start tens of microseconds late and would otherwise hold its fixed share (and its peers'
  // barrier) that long. With one rank the fixed stride (no ticket to reset).
  const int first_round = gridDim.x * warps;
  const auto next_token = [&](int t) {
    return p.local_only ? t + first_round : warp_next_ticket(p.s.push_ticket, first_round);
  };
  for (int t = ok ? blockIdx.x * warps + warp_id() : p.io.T; t < p.io.T;) {
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
      // (compact rows need no expert-major row: ebase may not be written yet when a compact
      // push starts, see push_wait_for_rows)
      if (p.expand) erow = p.s.ebase[e] + pre[e] + (rk >> 16);
      crow = compact_row_of(p, cbase, t, edst, rk);
    }
    warp_write_send_row(handle_row(p.io.handle, t, W), W, K,
                        __popc(dmask), edst, p.expand ? erow : crow);
    const char* xrow = p.io.x + static_cast<int64_t>(t) * p.io.x_bytes;
    const char* srow = p.io.scales + static_cast<int64_t>(t) * p.io.s_bytes;
    // compact layout: lane i < nd gets the i-th destination's row of x and of scales; the
    // row is then read once and stored to all of them (warp_copy_fanout)
    char *xd = nullptr, *sd = nullptr;
    int nd = 0;
    for (unsigned rest = dmask; rest != 0; rest &= rest - 1) {
      const int d = __ffs(rest) - 1;
      const unsigned at_d = __ballot_sync(0xffffffffu, edst == d);  // nonzero: d is in dmask
      const int row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1);  // compact row at d
      const int cslot = __popc(dmask & ((1u << d) - 1u));
      if (!p.expand) {
        compact_destination(p, d, row, t, cslot, e, wgt, outs, 7, nd, xd, sd);
        continue;
      }
      // expert-major: every expert-major row of the token at d (or the staging row there)
      const bool here = edst == d;
      if (d == me) {
        warp_copy_rows(p.io.recv_x, erow, at_d, xrow, p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy_rows(p.io.recv_s, erow, at_d, srow, p.io.s_bytes);
        warp_write_expand_group(recv_h, W, K, row, me, t, cslot, here ? e - me * p.E_loc : -1, erow,
                                wgt, static_cast<int*>(p.io.recv_idx), p.io.recv_w);
        continue;
      }
      char* base = peer_ptr(p.comm, d);
      write_meta_row(p, base, d, row, t, cslot, e, erow, wgt);
      const long long ox = outs.x[d], os = outs.s[d];
      if (ox < 0) {  // staged: the destination's epilogue copies the rows out
        warp_copy(base + p.rows.x_off + static_cast<int64_t>(row) * p.rows.x_stride, xrow, p.io.x_bytes);
        if (p.io.s_bytes > 0)
          warp_copy(base + p.rows.s_off + static_cast<int64_t>(row) * p.rows.s_stride, srow, p.io.s_bytes);
      } else {
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
  push_finish(p, stamp, &rows_done_ns);
}

// ---- the pipelined compact push (R >= 2, rows and scale packs at 16-byte multiples) ----
//
// The push above spends a token in dependent round trips: ticket, routing, the rows' bases,
// then the row in rounds of 4 KiB per warp (8 loads per lane), then the scale pack. At 24 SMs
// that made its rows ~1.5x slower than a plain fan-out copy of the same bytes
// (bench/probes/row_fanout_rate.cu). Here a warp starts copying a token's whole row (up to
// 8 KiB) and scale pack (up to 512 bytes) into its shared-memory stage at once (cp.async: no
// registers held while they fly), then, while they fly, works out its rows from a table of
// every count block's bases in shared memory and loads the next token's ticket and routing; so
// a token costs about one round trip. (Routing two tokens ahead cost registers past the 80 a
// 768-thread CTA has: spills, which with 204 KiB of stages miss the small L1, and the rows took
// ~15 us longer at R = 2; bench/NOTES.md v15.)
//
// Fused (an experiment, DEEP_EP_OPS_DISPATCH_FUSED=1): the kernel is the whole count too, no
// layout kernel before it. Its CTAs take count blocks by ticket (a CTA whose SM is late takes
// none), the CTA that counts the last block publishes the scan and the counts
// (layout_phases.cuh), and every CTA then pushes tokens by ticket. Meant to start the rows a
// kernel boundary and a flag round trip sooner; measured, the rows waited as long (the count
// itself is the wait) and ran slower (the count's code costs the loop registers: spills), so
// it stays off (bench/NOTES.md v15).

// A token's routing as the push needs it (lane k < K: slot k; the count wrote rank only for
// valid slots, so the value of a -1 slot is unused).
struct TokenRouting {
  unsigned dmask = 0;  // destination ranks
  int e = -1;          // expert of slot `lane`, -1: none
  float wgt = 0.f;
  int rank = 0;  // the token's rank among its count block's tokens sent to slot `lane`'s rank
};

// (tok_dmask / tok_rank: written by other CTAs of the fused kernel, read past L1)
__device__ __forceinline__ TokenRouting load_routing(const PushParams& p, int t) {
  TokenRouting r;
  r.dmask = __ldcg(p.s.tok_dmask + t);
  load_slot(p.io, t, r.e, r.wgt);
  if (lane_id() < p.io.K) r.rank = __ldcg(p.s.tok_rank + static_cast<int64_t>(t) * p.io.K + lane_id());
  return r;
}

constexpr int kStageRowVecs = 16;  // 16-byte pieces per lane staged: rows up to 8 KiB at once
constexpr int kStageScaleVecs = 1;  // scale packs up to 512 bytes
constexpr int kStageVecs = (kStageRowVecs + kStageScaleVecs) * kWarp;  // per warp
// More warps than the general loop (its rows sit in registers; these in shared memory): a warp's
// tokens are latency-bound (ticket, routing, bases, then the row), so more of them per SM move
// more rows at once. 24 warps x 8.5 KiB of stages fit a Hopper SM's shared memory.
constexpr int kPipelinedThreads = 768;
constexpr int kPipelinedWarps = kPipelinedThreads / kWarp;
constexpr int kPipelinedSmemBytes = kStageVecs * 16 * kPipelinedWarps;

// Lane `from`'s pointer, on every lane.
__device__ __forceinline__ char* lane_ptr(char* q, int from) {
  return reinterpret_cast<char*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(q), from));
}

// Lane l stages 16-byte pieces l, l + 32, ... (n of them, at most kVecs * 32) of src and later
// stores the same pieces, so with aligned destinations no lane waits for another's copies.
// kHinted: the reads here and the stores in store_pieces carry `policy` (PushParams::row_l2_evict).
template <int kVecs, bool kHinted>
__device__ __forceinline__ void stage_pieces(const char* src, int n, int4* stage,
                                             unsigned long long policy) {
  const int lane = lane_id();
  const int4* v = reinterpret_cast<const int4*>(src);
#pragma unroll
  for (int u = 0; u < kVecs; ++u)
    if (u * kWarp + lane < n) {
      if constexpr (kHinted) cp_async_16_hinted(stage + u * kWarp + lane, v + u * kWarp + lane, policy);
      else cp_async_16(stage + u * kWarp + lane, v + u * kWarp + lane);
    }
}

// The staged pieces to dst; a destination off 16 bytes (a peer's slot could in principle be)
// takes them byte by byte, for which the warp first syncs (lanes then read others' pieces).
template <int kVecs, bool kHinted>
__device__ __forceinline__ void store_pieces(char* dst, int n, const int4* stage, bool aligned,
                                             unsigned long long policy) {
  const int lane = lane_id();
  if (aligned) {
    int4* d = reinterpret_cast<int4*>(dst);
#pragma unroll
    for (int u = 0; u < kVecs; ++u)
      if (u * kWarp + lane < n) {
        if constexpr (kHinted) st_16_hinted(d + u * kWarp + lane, stage[u * kWarp + lane], policy);
        else d[u * kWarp + lane] = stage[u * kWarp + lane];
      }
    return;
  }
  __syncwarp();
  const char* b = reinterpret_cast<const char*>(stage);
  for (int i = lane; i < n * 16; i += kWarp) dst[i] = b[i];
}

// The rest of a row (or scale pack) past what the first stage held, chunk by chunk through
// the stage, to the destinations of lanes [0, nd) (lane i holds the i-th one in `dst`).
template <int kVecs, bool kHinted>
__device__ void stage_rest(const char* src, int64_t bytes, char* dst, int nd, int4* stage, bool aligned,
                           unsigned long long policy) {
  constexpr int64_t kChunk = 16LL * kVecs * kWarp;
  for (int64_t off = kChunk; off < bytes; off += kChunk) {
    const int n = static_cast<int>(min(kChunk, bytes - off) / 16);
    __syncwarp();  // every lane is done with the stage's previous pieces
    stage_pieces<kVecs, kHinted>(src + off, n, stage, policy);
    cp_async_wait_all();
    for (int i = 0; i < nd; ++i) {
      store_pieces<kVecs, kHinted>(lane_ptr(dst, i) + off, n, stage, aligned, policy);
    }
  }
}

// The count of the fused push (every thread; after its PDL wait): count blocks by ticket; the
// CTA that counts the last one publishes the scan and the counts and does the per-expert part
// (with the handle's header row). The kernel then waits for what its rows need as the unfused
// push does (push_wait_for_rows).
template <int KMAX>
__device__ __forceinline__ void fused_count(const PushParams& p, int* count_smem, int* shared_int) {
  const LayoutParams& lp = p.lay;
  const unsigned long long t_start = global_ns();
  const uint32_t epoch = layout_epoch(p.comm.epochs);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.s.kernel_times[kLayoutStart] = t_start;
    announce_entry(lp, epoch);
  }
  const CountSmem m = carve_count_smem(count_smem, lp.warps, lp.E, p.comm.num_ranks);
  const int blocks = count_blocks(p.io.T, p.cta_tokens);
  for (;;) {
    __syncthreads();  // every thread read *shared_int of the previous round
    if (threadIdx.x == 0) *shared_int = static_cast<int>(atomicAdd(p.s.count_ticket, 1u));
    __syncthreads();
    const int b = *shared_int;
    if (b >= blocks) return;
    count_block<KMAX>(lp, b, lp.warps, m);
    if (!counted_last_block(lp, blocks, shared_int)) continue;
    publish_counts(lp, blocks, epoch, m, t_start);
    expert_part(lp, epoch, m, t_start, p.io.handle);
    return;
  }
}

// kFused: p.fused, as its own instantiation (the unfused one keeps the loop's registers free
// of the count's: 74 without spills). kHinted: p.row_l2_evict (unfused only), likewise, so the
// default loop's code stays as it was. kSplitTail: p.split_tail (unfused, hinted), likewise:
// the last tokens go out in halves (two tickets each, the first of which also writes the
// token's routing), so the last tickets take a warp half a token's time and the rows' end
// spreads over the CTAs that much less.
template <int KMAX, bool kFused, bool kHinted, bool kSplitTail = false>
__global__ void __launch_bounds__(kPipelinedThreads, 1) dispatch_push_pipelined_kernel(PushParams p) {
  // [warps][kStageVecs] stages, then the base table; the fused count uses the stages first
  extern __shared__ __align__(16) int4 row_stages[];
  __shared__ unsigned long long rows_done_ns;
  __shared__ PeerOutputs outs;
  __shared__ int cbase[kMaxRanks], bases_ok, count_at;
  unsigned long long* stamp = p.s.push_times + static_cast<int64_t>(blockIdx.x) * kPushStamps;
  if (kFused) pdl_wait();  // x and the routing are ready; the last epilogue reset the tickets
  push_prologue(p, stamp);
  if (threadIdx.x == 0) rows_done_ns = 0;
  if (kFused) fused_count<KMAX>(p, reinterpret_cast<int*>(row_stages), &count_at);
  const int lane = lane_id(), warps = blockDim.x / kWarp;
  const int K = p.io.K, W = p.io.W, R = p.comm.num_ranks, T = p.io.T;
  // every count block's compact bases at every destination ([block][R], p.base_table ints)
  int* base_table = reinterpret_cast<int*>(row_stages + warps * kStageVecs);
  const bool ok = push_wait_for_rows(p, stamp, outs, cbase, &bases_ok, base_table);
  int4* stage = row_stages + warp_id() * kStageVecs;
  const unsigned long long policy = kHinted ? l2_evict_first_policy() : 0ull;
  // (p.skip: timing experiments only, the outputs are then wrong; see PushParams::skip)
  const bool no_ticket = p.skip & 2, no_stores = p.skip & 4, no_loads = p.skip & 8;
  // (p.routing_by_count: the count blocks wrote the send rows and every routing row but the
  // peers' metadata rows)
  const bool no_send_row = (p.skip & (1 | 16)) || p.routing_by_count;
  const int routing = (p.skip & (1 | 32) || p.routing_by_count ? 0 : 1) |
                      (p.skip & (1 | 64) ? 0 : p.routing_by_count ? 2 : 6);
  const auto compact_row = [&](int t, int d, int rank) {
    return p.base_table > 0 ? base_table[t / p.cta_tokens * R + d] + tok_rank_in_block(rank)
                            : compact_row_of(p, cbase, t, d, rank);
  };
  // Work items by ticket (lane 0 asks, every lane gets it), the unfused push's first one per
  // warp fixed (its row may be in L2 already); the fused push's CTAs start their rows at
  // different times (the publisher last), so all of its items come by ticket. An item is a
  // token, except past `split` (kSplitTail): items split + 2j and split + 2j + 1 are the two
  // halves of token split + j.
  const bool first_by_ticket = kFused && !no_ticket;
  const int stride = gridDim.x * warps, first_round = first_by_ticket ? 0 : stride;
  const int split = kSplitTail ? max(0, T - p.split_tail * stride / 4) : T;
  const int items = kSplitTail ? 2 * T - split : T;
  const auto token_at = [&](int i) {
    return !kSplitTail || i < split ? i : split + ((i - split) >> 1);
  };
  const auto ask = [&]() { return lane == 0 ? atomicAdd(p.s.push_ticket, 1u) : 0u; };
  const auto item_of = [&](unsigned ticket) {
    return first_round + static_cast<int>(__shfl_sync(0xffffffffu, ticket, 0));
  };
  int item = !ok ? items : first_by_ticket ? item_of(ask()) : blockIdx.x * warps + warp_id();
  // the item's token's routing; lane 0's ticket for the next item is outstanding exactly when
  // item < items (a ticket below items is never dropped)
  TokenRouting r;
  unsigned asked = 0;
  if (item < items) {
    r = load_routing(p, token_at(item));
    if (!no_ticket) asked = ask();
  }
  while (item < items) {
    const int t = token_at(item);
    // the item's bytes of the token's row and scale pack (a half: the host keeps halves at
    // 16-byte multiples), and how many 16-byte pieces of them are staged at once (rows over
    // 8 KiB: bf16 at H > 4096, scale packs over 512 bytes have a second pass)
    const bool half = kSplitTail && item >= split;
    const int part = half ? (item - split) & 1 : 0;
    const int64_t xb = half ? p.io.x_bytes / 2 : p.io.x_bytes;
    const int64_t sb = half ? p.io.s_bytes / 2 : p.io.s_bytes;
    const int nx = min(static_cast<int>(xb / 16), kStageRowVecs * kWarp);
    const int ns = min(static_cast<int>(sb / 16), kStageScaleVecs * kWarp);
    const char* xrow = p.io.x + static_cast<int64_t>(t) * p.io.x_bytes + part * xb;
    const char* srow = p.io.scales + static_cast<int64_t>(t) * p.io.s_bytes + part * sb;
    if (!no_loads) {
      stage_pieces<kStageRowVecs, kHinted>(xrow, nx, stage, policy);
      stage_pieces<kStageScaleVecs, kHinted>(srow, ns, stage + kStageRowVecs * kWarp, policy);
    }
    // the next item and its token's routing, in flight with this item's bytes
    const int nitem = no_ticket ? item + stride : item_of(asked);
    TokenRouting rn;
    if (nitem < items) {
      rn = load_routing(p, token_at(nitem));
      if (!no_ticket) asked = ask();
    }
    // final compact row of slot `lane`
    const int edst = r.e >= 0 ? r.e / p.E_loc : -1;
    const int crow = r.e >= 0 ? compact_row(t, edst, r.rank) : -1;
    const unsigned dmask = r.dmask;
    if (!no_send_row && part == 0)
      warp_write_send_row(handle_row(p.io.handle, t, W), W, K,
                          __popc(dmask), edst, crow);
    char *xd = nullptr, *sd = nullptr;  // lane i < nd: the i-th destination's rows
    int nd = 0;
    for (unsigned rest = dmask; rest != 0; rest &= rest - 1) {
      const int d = __ffs(rest) - 1;
      const unsigned at_d = __ballot_sync(0xffffffffu, edst == d);  // nonzero: d is in dmask
      const int row = __shfl_sync(0xffffffffu, crow, __ffs(at_d) - 1);
      const int cslot = __popc(dmask & ((1u << d) - 1u));
      compact_destination(p, d, row, t, cslot, r.e, r.wgt, outs, part == 0 ? routing : 0, nd, xd,
                          sd);
    }
    if (no_stores) nd = 0;
    if (part != 0 && lane < nd) {
      xd += xb;
      sd += sb;
    }
    const bool aligned =
        __ballot_sync(0xffffffffu, lane < nd && ((reinterpret_cast<uintptr_t>(xd) |
                                                  reinterpret_cast<uintptr_t>(sd)) & 15u)) == 0;
    cp_async_wait_all();
    for (int i = 0; i < nd; ++i) {
      store_pieces<kStageRowVecs, kHinted>(lane_ptr(xd, i), nx, stage, aligned, policy);
      store_pieces<kStageScaleVecs, kHinted>(lane_ptr(sd, i), ns, stage + kStageRowVecs * kWarp, aligned,
                                             policy);
    }
    // (rows over 8 KiB, scale packs over 512 bytes; nothing for the usual sizes)
    stage_rest<kStageRowVecs, kHinted>(xrow, xb, xd, nd, stage, aligned, policy);
    stage_rest<kStageScaleVecs, kHinted>(srow, sb, sd, nd, stage + kStageRowVecs * kWarp, aligned,
                                         policy);
    __syncwarp();  // every lane is done with the stage before the next item's copies
    item = nitem;
    r = rn;
  }
  if (lane == 0) atomicMax(&rows_done_ns, global_ns());
  push_finish(p, stamp, &rows_done_ns);
}

// kDirect: p.direct, as its own instantiation: without the row copies the kernel needs a
// fraction of the copies' registers (128), so more of its CTAs fit an SM at once.
template <bool kDirect>
__global__ void __launch_bounds__(512) dispatch_epilogue_kernel(EpilogueParams p) {
  pdl_wait();
  pdl_trigger();
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.s.kernel_times[kEpilogueStart] = global_ns();
    // the push is done with them (the next dispatch's first kernel waits for this grid)
    end_dispatch_call(p.s, p.epochs);
  }
  const int K = p.io.K, W = p.io.W;
  const int* info = p.s.recv_info;
  const int G = info[kRecvG];
  const int local_lo = info[recv_local_lo(p.E_loc)];
  const int local_n = info[recv_local_n(p.E_loc)];
  const int lane = lane_id();
  const int warps = blockDim.x / kWarp;
  const int gwarp = blockIdx.x * warps + warp_id();
  const int nwarps = gridDim.x * warps;

  int* recv_h = handle_row(p.io.handle, p.io.T, W);
  int64_t* idx64 = static_cast<int64_t*>(p.io.recv_idx);
  int* idx32 = static_cast<int*>(p.io.recv_idx);
  // groups from the other ranks: [0, G) without this rank's own [local_lo, local_lo + local_n)
  const int others = G - local_n;
  const auto group_row = [&](int q) { return q < local_lo ? q : q + local_n; };
  // group i's metadata row (compact row i in the window): lane k < K holds slot k
  struct Meta {
    int src, tok, cslot, j = -1, erow = -1;
    float wgt = 0.f;
  };
  const auto load_meta = [&](int i) {
    const int* meta =
        reinterpret_cast<const int*>(p.win + p.rows.m_off) + static_cast<int64_t>(i) * p.rows.meta_ints;
    Meta m;
    m.src = meta[0];
    m.tok = meta[1];
    m.cslot = meta[2];
    if (lane < K) {
      m.j = meta[4 + lane];
      m.erow = meta[4 + K + lane];
      m.wgt = __int_as_float(meta[4 + 2 * K + lane]);
    }
    return m;
  };
  const auto window_x = [&](int i) { return p.win + p.rows.x_off + static_cast<int64_t>(i) * p.rows.x_stride; };
  const auto window_s = [&](int i) { return p.win + p.rows.s_off + static_cast<int64_t>(i) * p.rows.s_stride; };
  if (!p.expand) {
    // compact: a warp's rows two at a time, both metadata loads in flight at once (with direct
    // outputs they are all the latency there is)
    for (int q = gwarp; q < others; q += 2 * nwarps) {
      const int i0 = group_row(q), q1 = q + nwarps, i1 = q1 < others ? group_row(q1) : -1;
      const Meta m0 = load_meta(i0);
      Meta m1;
      if (i1 >= 0) m1 = load_meta(i1);
      for (int u = 0; u < 2; ++u) {
        const int i = u == 0 ? i0 : i1;
        if (i < 0) break;
        const Meta& m = u == 0 ? m0 : m1;
        if (!kDirect) {
          warp_copy(p.io.recv_x + static_cast<int64_t>(i) * p.io.x_bytes, window_x(i), p.io.x_bytes);
          if (p.io.s_bytes > 0)
            warp_copy(p.io.recv_s + static_cast<int64_t>(i) * p.io.s_bytes, window_s(i), p.io.s_bytes);
        }
        if (lane < K) {
          idx64[static_cast<int64_t>(i) * K + lane] = m.j;
          p.io.recv_w[static_cast<int64_t>(i) * K + lane] = m.wgt;
        }
        warp_write_compact_recv_row(recv_h + static_cast<int64_t>(i) * W, W, m.src, m.tok, i, m.cslot);
      }
    }
  } else {
    for (int q = gwarp; q < others; q += nwarps) {
      const int i = group_row(q);
      const Meta m = load_meta(i);
      const unsigned local = __ballot_sync(0xffffffffu, m.j >= 0);
      warp_write_expand_group(recv_h, W, K, i, m.src, m.tok, m.cslot, m.j, m.erow, m.wgt, idx32,
                              p.io.recv_w);
      if (!kDirect) {
        warp_copy_rows(p.io.recv_x, m.erow, local, window_x(i), p.io.x_bytes);
        if (p.io.s_bytes > 0) warp_copy_rows(p.io.recv_s, m.erow, local, window_s(i), p.io.s_bytes);
      }
    }
  }
  // (profiling: the latest CTA done with the other ranks' groups, which is the kernel's end;
  // the clock only grows, so the latest CTA's end wins without a reset between calls)
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(p.s.kernel_times + kEpilogueEnd, global_ns());
}

}  // namespace

cudaError_t launch_dispatch_push(const PushParams& p, int ctas, cudaStream_t stream) {
  if (p.pipelined) {
    // unfused, fused with K <= 8, fused with more (the count keeps K experts per lane in
    // registers: 8 for the usual K), unfused with the rows' L2 hints, the same with the last
    // tokens in halves
    using Kernel = void (*)(PushParams);
    static const Kernel kernels[5] = {dispatch_push_pipelined_kernel<8, false, false>,
                                      dispatch_push_pipelined_kernel<8, true, false>,
                                      dispatch_push_pipelined_kernel<kMaxTopk, true, false>,
                                      dispatch_push_pipelined_kernel<8, false, true>,
                                      dispatch_push_pipelined_kernel<8, false, true, true>};
    static const std::array<int, std::size(kernels)> room = [] {
      std::array<int, std::size(kernels)> r{};
      for (size_t i = 0; i < r.size(); ++i)
        r[i] = raise_dynamic_smem_limit(reinterpret_cast<const void*>(kernels[i]));
      return r;
    }();
    const int which =
        p.fused ? (p.io.K <= 8 ? 1 : 2) : !p.row_l2_evict ? 0 : p.split_tail > 0 ? 4 : 3;
    const int64_t smem = kPipelinedSmemBytes + int64_t{p.base_table} * static_cast<int64_t>(sizeof(int));
    if (smem > room[which]) return cudaErrorInvalidValue;  // the fits() said so
    return launch_pdl(kernels[which], ctas, kPipelinedThreads, static_cast<size_t>(smem), stream, p);
  }
  if (p.bulk_row_bytes == 0) return launch_pdl(dispatch_push_kernel<false>, ctas, kPushThreads, 0, stream, p);
  static const int room =
      raise_dynamic_smem_limit(reinterpret_cast<const void*>(dispatch_push_kernel<true>));
  const int smem = p.bulk_row_bytes * kBulkWarps;
  if (smem > room) return cudaErrorInvalidValue;  // bulk_row_limit() promised what is not there
  return launch_pdl(dispatch_push_kernel<true>, ctas, kPushThreads, smem, stream, p);
}

bool pipelined_push_fits(size_t smem_optin) {
  return static_cast<size_t>(kPipelinedSmemBytes + kBulkStaticReserve) <= smem_optin;
}

int fused_count_warps(int E, int R) {
  for (int w = kPipelinedWarps; w > 0; --w)
    if (count_smem_ints(w, E, R) * sizeof(int) <= static_cast<size_t>(kPipelinedSmemBytes)) return w;
  return 0;
}

bool base_table_fits(size_t smem_optin, int64_t ints) {
  return kPipelinedSmemBytes + kBulkStaticReserve + ints * static_cast<int64_t>(sizeof(int)) <=
         static_cast<int64_t>(smem_optin);
}

cudaError_t launch_dispatch_epilogue(const EpilogueParams& p, int ctas, cudaStream_t stream) {
  return p.direct ? launch_pdl(dispatch_epilogue_kernel<true>, ctas, 512, 0, stream, p)
                  : launch_pdl(dispatch_epilogue_kernel<false>, ctas, 512, 0, stream, p);
}

}  // namespace deep_ep_ops
