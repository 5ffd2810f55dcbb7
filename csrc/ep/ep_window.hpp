// Where everything lives in the EP window (the same byte offsets on every rank), in one place:
// the state sizes the window from these functions and every launch takes its offsets from them,
// so the sizing and the use cannot disagree. Kernels receive the offsets in their parameters
// (Comm, DispatchRows, CachedParams, CombineParams).
//
//   [flags]  uint32 flags[kNumSlots][kMaxRanks]: barrier epochs announced by each rank
//   [counts] int32 counts[R][E + R]: row s = rank s's per-expert and per-rank send counts
//   [outs]   int64 outs[kMaxRanks][kOutsPerRank]: where rank s wants this dispatch's rows of x
//            and of scales written (offsets of its output slot from its window base), -1:
//            staged, and its routing outputs (SlotRouting's offset), -1: metadata rows;
//            then int64 cins[kMaxRanks]: where rank s's combine input lives when the peers
//            may read it in place (offset of its combine-input slot), -1: it pushes partials;
//            then int64 cins_seen[kMaxRanks]: this rank's copy of cins made behind the
//            combine's first barrier, which its reduce reads (cins itself may already hold
//            the next combine's values by then)
//   [tokens] uint64 tokens[kMaxRanks][kMaxRanks]: (epoch << 32) | rank s's token count to rank
//            d, stored by rank s's layout publisher into the windows of the ranks above it
//   [blocks] uint64 blocks[R][max_count_blocks(M)][R]: (epoch << 32) | (rank s's count blocks
//            << 16) | tokens of rank s's count block b sent to rank d, stored by that block
//            itself into the window of rank s and of every rank above it (the compact push's
//            bases without the publisher: dispatch.cu wait_block_words)
//   [data]   dispatch rows / cached-dispatch staging / combine staging (reused by every op;
//            each op starts behind a barrier so peers are done with the previous one)
//   [slots]  direct-output slots (Buffer(direct_outputs=N)): N regions that hold a dispatch's
//            recv_x and recv_scales (and, compact, its routing outputs and handle), handed out
//            as the op's output tensors, so peers write rows straight into them and the
//            epilogue copies nothing (compact: no epilogue at all)
//   [cins]   combine-input slots (Buffer(zero_copy_combine=True)): 2 regions, handed out in
//            turn by buf.combine_input(); a combine whose x is one of them lets the peers
//            read its rows in place instead of receiving pushed partials
#pragma once

#include <algorithm>
#include <cstdint>

#include "../host/cuda_check.hpp"  // align_up
#include "ep_launch.hpp"

namespace deep_ep_ops {

struct EpWindow {
  int64_t flags_off = 0, counts_off = 0, outs_off = 0, tokens_off = 0, blocks_off = 0, data_off = 0;
  int64_t data_bytes = 0;    // size of the data region
  int64_t slots_off = 0;     // first direct-output slot
  int64_t slot_bytes = 0;    // size of each
  int num_slots = 0;
  int64_t cins_off = 0;      // cins[kMaxRanks] in the outs region, then cins_seen[kMaxRanks]
  int64_t cin_slots_off = 0, cin_slot_bytes = 0;
  int num_cin_slots = 0;     // 0 or kCombineInputSlots
  int64_t window_bytes = 0;  // whole window (2 MiB granules)

  // Dispatch rows in the data region: R*M rows of x (x_bytes each), of scales (s_bytes) and of
  // metadata. Metadata ints: [src rank, src token, combine slot, 0, local expert of slot k (K),
  // expert-major row of slot k (K), weight bits of slot k (K)].
  DispatchRows dispatch_rows(int R, int M, int K, int64_t x_bytes, int64_t s_bytes) const {
    const int64_t cap = static_cast<int64_t>(R) * M;
    DispatchRows r{};
    r.x_stride = align_up(x_bytes, 16);
    r.s_stride = align_up(s_bytes, 16);
    r.meta_ints = static_cast<int>(align_up(4 + 3 * K, 4));
    r.x_off = data_off;
    r.s_off = r.x_off + align_up(cap * r.x_stride, 256);
    r.m_off = r.s_off + align_up(cap * r.s_stride, 256);
    return r;
  }
  static int64_t dispatch_end(const DispatchRows& r, int R, int M) {
    return r.m_off + static_cast<int64_t>(R) * M * r.meta_ints * 4;
  }

  // cached_dispatch's staging: M rows of x and of scales.
  struct Staging {
    int64_t x_stride, s_stride, x_off, s_off, end;
  };
  Staging cached_staging(int M, int64_t x_bytes, int64_t s_bytes) const {
    Staging s{};
    s.x_stride = align_up(x_bytes, 16);
    s.s_stride = align_up(s_bytes, 16);
    s.x_off = data_off;
    s.s_off = s.x_off + align_up(M * s.x_stride, 256);
    s.end = s.s_off + M * s.s_stride;
    return s;
  }

  // combine's staging: min(R, K) fp32 partials of rows of `width` elements per token.
  int64_t combine_stage_off() const { return data_off; }
  static int64_t combine_stage_bytes(int M, int slots, int64_t width) {
    return static_cast<int64_t>(M) * slots * width * 4;
  }

  bool fits(int64_t end) const { return end - data_off <= data_bytes; }

  // A dispatch's outputs in a direct-output slot, as offsets from the slot's start: recv_x rows
  // back to back (as torch lays out [C, H]), then the scale rows from the next 256-byte
  // boundary; with `routing` (compact outputs: [C, K] routing tensors and a handle of at most
  // 1 + M + C rows of W ints) a region that the handle ends, then the routing tensors
  // (SlotRouting, from `routing_at`).
  struct SlotLayout {
    int64_t scales_at, routing_at, end;  // routing_at: -1 without routing
  };
  static SlotLayout slot_layout(int64_t C, int64_t x_bytes, int64_t s_bytes, bool routing, int K,
                                int W, int M) {
    SlotLayout l{align_up(C * x_bytes, 256), -1, 0};
    l.end = l.scales_at + C * s_bytes;
    if (routing) {
      l.routing_at = align_up(l.end, 256) + align_up((1 + M + C) * W * 4, 256);
      const SlotRouting r = SlotRouting::at(l.routing_at, C, K, W);
      l.end = r.w + C * K * 4;
    }
    return l;
  }
  bool slot_fits(const SlotLayout& l) const { return num_slots > 0 && l.end <= slot_bytes; }
  int64_t slot_off(int i) const { return slots_off + static_cast<int64_t>(i) * slot_bytes; }
  int64_t cin_slot_off(int i) const { return cin_slots_off + static_cast<int64_t>(i) * cin_slot_bytes; }

  // The window of a Buffer: the data region holds the widest use of every op (dispatch rows up
  // to fp32 wide, x may be fp32; bf16 and fp8 + scales are narrower). Each direct-output slot
  // holds a compact dispatch at full capacity (R*M rows, with its routing outputs and handle)
  // in the Buffer's dispatch dtype (fp8 rows with their scale packs, else bf16); wider rows,
  // or expert-major outputs of more rows, use a slot only where they fit.
  // Each combine-input slot holds R*M rows of H bf16 (a compact combine at full capacity).
  static constexpr int kCombineInputSlots = 2;
  static EpWindow plan(int R, int M, int H, int K, int E, int W, bool fp8, int direct_slots,
                       bool zero_copy_combine) {
    EpWindow w;
    w.flags_off = 0;
    w.counts_off = align_up(static_cast<int64_t>(kNumSlots) * kMaxRanks * 4, 4096);
    w.outs_off = w.counts_off + align_up(static_cast<int64_t>(R) * (E + R) * 4, 4096);
    w.cins_off = w.outs_off + static_cast<int64_t>(kMaxRanks) * kOutsPerRank * 8;
    w.tokens_off =
        w.outs_off + align_up(static_cast<int64_t>(kMaxRanks) * (kOutsPerRank + 2) * 8, 4096);
    w.blocks_off = w.tokens_off + align_up(static_cast<int64_t>(kMaxRanks) * kMaxRanks * 8, 4096);
    w.data_off = w.blocks_off + align_up(static_cast<int64_t>(R) * max_count_blocks(M) * R * 8, 4096);
    const int64_t packs = (H + 31) / 32;  // most 4-byte scale packs a row may carry
    const DispatchRows rows = w.dispatch_rows(R, M, K, 4LL * H, fp8 ? 4 * packs : 0);
    const int64_t need = std::max({dispatch_end(rows, R, M),
                                   w.cached_staging(M, 4LL * H, 4 * packs).end,
                                   w.combine_stage_off() +
                                       combine_stage_bytes(M, std::min(R, K), H)}) - w.data_off;
    w.data_bytes = align_up(need, 4096);
    w.slots_off = w.data_off + w.data_bytes;
    w.num_slots = direct_slots;
    if (direct_slots > 0) {
      const int64_t cap = static_cast<int64_t>(R) * M;
      const int64_t x_row = fp8 ? H : 2LL * H, s_row = fp8 ? 4 * packs : 0;
      w.slot_bytes = align_up(slot_layout(cap, x_row, s_row, true, K, W, M).end, 1 << 21);
    }
    w.cin_slots_off = w.slots_off + w.slot_bytes * direct_slots;
    if (zero_copy_combine) {
      w.num_cin_slots = kCombineInputSlots;
      w.cin_slot_bytes = align_up(static_cast<int64_t>(R) * M * H * 2, 1 << 21);
    }
    w.window_bytes = align_up(w.cin_slots_off + w.cin_slot_bytes * w.num_cin_slots, 1 << 21);
    return w;
  }
};

}  // namespace deep_ep_ops
