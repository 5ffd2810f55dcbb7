// Plain C++ view of the EP kernel launches (dispatch / cached_dispatch / combine): the window
// view, scratch, parameter structs and launch functions. Host code includes only this header,
// so torch headers and CUDA device code never meet in one translation unit (faster JIT builds,
// no template clashes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "../device/shared_types.hpp"
#include "generated/handle_layout.hpp"  // rendered from deep_ep_ops/handle.py (codegen)

namespace deep_ep_ops {

constexpr int kNumSlots = 256;             // barrier slots; CTA b of a barrier kernel uses slot b
constexpr int kLayoutSlot = kNumSlots - 1; // the one-CTA count exchange of dispatch
constexpr int kEnterSlot = kNumSlots - 2;  // dispatch: a rank entered the call (its output places)
constexpr int kMaxBarrierCtas = kNumSlots - 2;

// What every EP kernel receives by value: the peers' window bases and the region offsets of
// ep_window.hpp's EpWindow (the same on every rank), the barrier epochs and the wait context.
struct Comm {
  char* peer_base[kMaxRanks];  // window base address of every rank as mapped here
  unsigned* epochs;            // device-local epoch per barrier slot (graph-replay safe)
  WaitContext wait;            // error record, timeout
  int rank;
  int num_ranks;
  int64_t flags_off;
  int64_t counts_off;
  int64_t outs_off;    // where each rank wants its dispatch rows (EpWindow: [outs])
  int64_t tokens_off;  // dispatch: tokens each lower rank sends to each rank (EpWindow: [tokens])
  int64_t blocks_off;  // dispatch: each count block's tokens to each rank (EpWindow: [blocks])
  int max_blocks;      // max_count_blocks(M): the [blocks] region's stride per source rank
  int64_t data_off;
};

// Per-Buffer device scratch for dispatch (sized for M tokens at setup).
struct DispatchScratch {
  unsigned* tok_dmask;  // [M] destination-rank mask of each token
  int* tok_rank;        // [M*K] (t, k): rank of t among its count-CTA's tokens of expert k << 16
                        //   | rank of t among its count-CTA's tokens sent to slot k's rank
  int* cta_prefix;      // [layout_max_ctas(M) * (E+R)]: per count-CTA histograms, scanned in
                        //   place into exclusive per-CTA prefixes by the last CTA
  int* ebase;           // [E] expert-major row of the first of my tokens of expert e at e's rank
  unsigned* done;       // [1] count CTAs finished (the last one resets it to 0)
  int* send_handle;     // [W] handle header row (copied into the handle by the push kernel)
  int* recv_info;       // kRecvInfo* fields, then tokens_per_expert[E_loc], block_start[E_loc+1]
  // one-rank fused dispatch (local_dispatch.cu):
  unsigned long long* tile_status;  // [kMaxLocalTiles] (call tag << 32) | valid tokens of tile i
  int* tpe_acc;                     // [E] tokens per expert, summed by every tile; the last
                                    //   tile to finish copies it out and zeroes it
  unsigned* tile_ctr;               // [3] next tile ticket, tiles finished, tag of the last call
  // push kernel with more than one rank, per CTA of its last launch, for profiling: global
  // nanoseconds at its start, when it may start on rows (the compact bases, or its PDL wait),
  // when its last warp finished its tokens, and after its barrier
  unsigned long long* push_times;   // [kMaxBarrierCtas][kPushStamps]
  // push kernel with more than one rank: tokens after each warp's first (the fused push: every
  // token) are handed out by this ticket, so a CTA that starts late (its SM busy with another
  // process's kernel) finds its share done by the others instead of doubling the push time
  unsigned* push_ticket;            // [1]
  // the fused compact push: count blocks are handed out by this ticket (a CTA that starts late
  // counts none). Both tickets are reset by the epilogue, which runs after every push with more
  // than one rank, or by the push's last CTA when no epilogue follows (PushParams::ends_call).
  unsigned* count_ticket;           // [1]
  unsigned* push_exits;             // [1] push CTAs done with their tokens (ends_call only)
  // dispatch with more than one rank: the call's layout epoch once the layout's last CTA has
  // scanned the count blocks (cta_prefix, tok_rank are final) and sent its token counts to the
  // peers; a compact push starts on it instead of on the whole layout kernel's end (the
  // per-expert work is not the push's), and whatever ends the call (the epilogue, or the
  // push's last CTA) sets it back to 0
  unsigned* bases_ready;            // [1]
  unsigned* combine_ticket;         // [1] CombineParams::reduce_ticket
  // the last dispatch with more than one rank, global nanoseconds (profiling; the clock is the
  // GPU's, so ranks sharing a GPU can be lined up): kLayoutStart, kLayoutLastCta, kLayoutEnd,
  // kEpilogueStart, kEpilogueEnd (0 when no epilogue ran: PushParams::ends_call), and inside
  // the count the latest block to start counting (kCountStarted), to have its routing loaded
  // and ranked among each warp's tokens (kCountLoaded) and to have stored its ranks and
  // histogram (kCountStored)
  unsigned long long* kernel_times;  // [kKernelStamps]
};
constexpr int kPushStamps = 4;
enum KernelStamp {
  kLayoutStart, kLayoutLastCta, kLayoutEnd, kEpilogueStart, kEpilogueEnd, kCountStarted, kCountLoaded,
  kCountStored, kKernelStamps
};
constexpr int kMaxLocalTiles = 1024;  // CTAs of the one-rank fused dispatch (<= SMs)
// Count kernel: one warp per 32 tokens, at least one warp per CTA.
constexpr int layout_max_ctas(int max_tokens) { return (max_tokens + 31) / 32 + 1; }
// Count blocks of a dispatch of T tokens (one even for T = 0: its CTA still exchanges counts).
__host__ __device__ constexpr int count_blocks(int T, int cta_tokens) {
  return T > 0 ? (T + cta_tokens - 1) / cta_tokens : 1;
}
// Most count blocks a call of up to M tokens has (a count CTA counts 32 tokens per warp, at
// least one warp).
__host__ __device__ constexpr int max_count_blocks(int M) { return count_blocks(M, 32); }
constexpr int kRecvG = 0;           // groups (compact rows) received
constexpr int kRecvPairs = 1;       // (token, local expert) pairs received
constexpr int kRecvAligned = 2;     // sum of aligned per-expert counts
constexpr int kRecvTpe = 8;         // offset of tokens_per_expert
// After tokens_per_expert[E_loc] and block_start[E_loc + 1]: the compact rows [lo, lo + n) at
// this rank that carry this rank's own tokens (the push writes them and their handle rows
// directly; the epilogue skips them).
constexpr int recv_local_lo(int e_loc) { return kRecvTpe + 2 * e_loc + 1; }
constexpr int recv_local_n(int e_loc) { return kRecvTpe + 2 * e_loc + 2; }
constexpr int recv_info_ints(int e_loc) { return kRecvTpe + 2 * e_loc + 8; }

// Row layout of dispatch in the data region (EpWindow::dispatch_rows): x rows, scale rows and
// metadata rows, each for R*M compact rows.
struct DispatchRows {
  int64_t x_off, s_off, m_off;  // offsets from the window base
  int64_t x_stride, s_stride;   // bytes
  int meta_ints;                // ints per metadata row
};

// Row `row` of a routing handle [1 + T + C, W] counted past its header row: token t's send row
// at row = t, the first row of the receive part at row = T (one host: no virtual rows between).
template <typename Int>
DEO_HOST_DEVICE Int* handle_row(Int* handle, int row, int W) {
  return handle + static_cast<int64_t>(handle::kHeaderRows + row) * W;
}

// Where one destination's compact routing rows go: recv_topk_idx int64 [C, K], recv_topk_weights
// float32 [C, K] and the handle's receive rows [C, W] (this rank's outputs, or a peer's slot:
// SlotRouting::rows_in).
struct RoutingRows {
  int64_t* idx;
  float* w;
  int* recv_h;
};

// The routing outputs of a compact dispatch inside a direct-output slot, when the peers write
// them there too (ep_window.hpp slot_layout): the receiver publishes one offset `r` from its
// window base (EpWindow: [outs]), and the rest follows from C, K and W, which are the same on
// every rank: recv_topk_idx int64 [C, K] at r, recv_topk_weights float32 [C, K] after it, and the
// handle [1 + T + C, W] ending right at r, so its receive rows (the last C) start at the same
// place whatever this rank's T.
struct SlotRouting {
  int64_t idx, w, handle_recv;  // offsets from the window base
  DEO_HOST_DEVICE static SlotRouting at(int64_t r, int64_t C, int K, int W) {
    const int64_t idx_bytes = (C * K * 8 + 255) / 256 * 256;
    return {r, r + idx_bytes, r - C * W * 4};
  }
  // where the handle of a call with T tokens starts
  DEO_HOST_DEVICE int64_t handle_start(int T, int W) const {
    return handle_recv - static_cast<int64_t>(handle::kHeaderRows + T) * W * 4;
  }
  // the rows themselves, in the window that starts at `window` (the receiver's, as mapped here)
  DEO_HOST_DEVICE RoutingRows rows_in(char* window) const {
    return {reinterpret_cast<int64_t*>(window + idx), reinterpret_cast<float*>(window + w),
            reinterpret_cast<int*>(window + handle_recv)};
  }
};
constexpr int kOutsPerRank = 3;  // EpWindow [outs]: x, scales and routing offsets of each rank

struct LayoutParams {
  const void* topk_idx;
  int idx64;
  int T, K, E, E_loc, A, M, expand, W;
  int C;           // rows of the dispatch's outputs (handle header)
  int buffer_id;   // handle header
  // this rank's recv_x / recv_scales as offsets from its window base when they live in a
  // direct-output slot (the peers write rows there), else -1 (rows go through the window);
  // out_r_off: its routing outputs there too (SlotRouting), else -1 (metadata rows)
  int64_t out_x_off, out_s_off, out_r_off;
  int warps;       // warps per count CTA (each warp counts 32 tokens)
  int cta_tokens;  // tokens per count CTA: 32 * warps
  // Each count CTA writes its tokens' handle send rows and compact routing rows (this rank's
  // outputs, and each peer's direct-output slot that holds routing outputs) once its bases are
  // known, staged per warp, instead of the push beside every row (block_routing.cuh;
  // compact rows, the pipelined push with block words; DEEP_EP_OPS_ROUTING_BY_COUNT=0 for A/B
  // runs). The push then writes only the metadata rows of peers without such a slot.
  int block_routing;
  const float* topk_w;  // with block_routing: the routing's weights
  int64_t* recv_idx;    // with block_routing: this rank's recv_topk_idx [C, K]
  float* recv_w;        // ... its recv_topk_weights [C, K]
  int* handle;          // ... its handle [1 + T + C, W]
  DispatchScratch s;
  Comm comm;
};

// A dispatch's inputs and this rank's fresh outputs, as the kernels that write outputs see them.
struct DispatchIO {
  const char* x;
  const char* scales;
  const void* topk_idx;
  const float* topk_weights;
  char* recv_x;
  char* recv_s;
  void* recv_idx;  // int64 [C, K] compact, int32 [C] expand
  float* recv_w;
  int* tpe;     // [E_loc]
  int* handle;  // [1 + T + C, W]
  int idx64;
  int64_t x_bytes, s_bytes;  // per row
  int T, K, E, W, C;
};

struct PushParams {
  // rows for this rank itself (data, routing tensors, handle receive rows) go straight into
  // io's outputs; with more ranks the header and send part too
  DispatchIO io;
  int E_loc, expand, cta_tokens;
  int local_only;  // 1 rank: no window, no barrier; the push also does the epilogue's work
  // bytes of a row (x, then scales) in each warp's shared buffer when the compact rows fan out
  // by bulk copies (DEEP_EP_OPS_BULK_COPY=1, ep_ops.cpp bulk_rows); 0: off
  int bulk_row_bytes;
  // the pipelined compact loop (dispatch.cu): R >= 2, compact, no bulk fan-out, rows and scale
  // packs at 16-byte multiples and addresses (default; DEEP_EP_OPS_PUSH_PIPELINE=0 for A/B runs)
  int pipelined;
  // the pipelined loop counts too (no layout kernel before it; `lay` is what the count needs,
  // with lay.warps counting warps per CTA): an experiment, DEEP_EP_OPS_DISPATCH_FUSED=1, where
  // the count's shared memory fits in the stages (bench/NOTES.md v15: not faster yet)
  int fused;
  LayoutParams lay;
  // ints of the pipelined loop's table of every count block's compact bases in shared memory
  // (count_blocks(T, cta_tokens) * R, after the stages; 0: no table, read them per token)
  int base_table;
  // the pipelined loop builds that table from the count blocks' own words (EpWindow: [blocks])
  // instead of waiting for the layout's publisher (bases_ready and the token words): needs
  // base_table; DEEP_EP_OPS_BLOCK_WORDS=0 turns it off (A/B)
  int block_words;
  // timing experiments on the pipelined loop only (DEEP_EP_OPS_PUSH_SKIP, bits; the outputs are
  // then wrong): 1 no routing / handle / metadata stores, 2 fixed token stride instead of the
  // ticket, 4 no row stores, 8 no row loads; parts of 1: 16 no handle send rows, 32 no routing
  // tensors / handle receive rows of this rank's own rows, 64 no routing rows to the peers
  // (in their slots, or metadata rows)
  int skip;
  // pull each warp's first rows of x into L2 before waiting for the layout (an experiment,
  // DEEP_EP_OPS_PUSH_PREFETCH=1; off by default: the pulls compete with the count's loads, and
  // the pipelined loop stages rows itself, bench/NOTES.md v16)
  int prefetch;
  // the unfused pipelined loop loads and stores its rows' bytes under an L2 evict-first policy,
  // so the tens of MB streaming through L2 leave the call's small hot data (routing, flags,
  // metadata) there for the next kernels (default; DEEP_EP_OPS_ROW_L2_EVICT=0 for A/B runs)
  int row_l2_evict;
  // with row_l2_evict: the last split_tail / 4 x (the grid's warps) tokens go out as two
  // half-row tickets each (DEEP_EP_OPS_PUSH_SPLIT_TAIL; rows and scale packs at 32-byte
  // multiples): the rows' end spreads over the CTAs by about one ticket's time; 0: off
  int split_tail;
  // no epilogue follows (this rank's routing outputs sit in its direct-output slot, where the
  // peers write them): the push's last CTA to finish its tokens ends the call instead
  // (resets the tickets, stores the layout epoch)
  int ends_call;
  // the layout's count CTAs wrote the send rows and every compact routing row but the peers'
  // metadata rows (LayoutParams::block_routing; pipelined loop only)
  int routing_by_count;
  DispatchRows rows;
  DispatchScratch s;
  Comm comm;
};

// One rank, compact layout, static capacity: the whole dispatch in one kernel.
struct LocalDispatchParams {
  DispatchIO io;  // recv_idx: int64 [C, K]
  int A, M;
  int buffer_id;  // handle header
  DispatchScratch s;
  Comm comm;  // timeouts and the error record only (no window traffic)
  int head_loads;  // set by the launcher: rows are 16-byte aligned (warps load a head early)
};

struct EpilogueParams {
  DispatchIO io;    // the same as the push kernel's (inputs unused)
  const char* win;  // local window base
  DispatchRows rows;
  int E_loc, expand;
  int direct;  // the peers wrote their rows of x and scales into io's outputs already
  // recv_info and kernel_times; bases_ready and the tickets are reset here (the push is done)
  DispatchScratch s;
  // the barrier epochs: the call's layout epoch is stored here, once every kernel of the call
  // that reads it is done (layout_phases.cuh layout_epoch)
  unsigned* epochs;
};

struct CachedParams {
  const char* x;
  const char* scales;
  const int* handle;
  char* out_x;
  char* out_s;
  int64_t x_bytes, s_bytes;
  int64_t x_stride, s_stride;  // staging strides in the window
  int64_t x_off, s_off;        // staging offsets from the window base
  int T, C, K, W;
  Comm comm;
};

// Dynamic shared memory of the combine reduce kernel when it stages its loads (reduce_via_smem).
constexpr size_t kCombineReduceSmemBytes = 128 * 1024;

struct CombineParams {
  const void* x;  // [C, Wd] bf16 / fp16 / fp32
  const float* weights;
  const int* handle;
  void* out;
  int64_t stage_off;   // offset of the staging area from the window base
  int num_slots;       // staged partials per token: min(R, K)
  int dtype;           // 0 fp32, 1 bf16, 2 fp16
  int stage_raw;       // 1: no weights; rows then travel as is if the layout is compact
  int Wd, C, T, K, W;
  // x is this rank's combine-input slot at this offset from its window base: the peers read
  // its rows in place and it pushes nothing; -1: it pushes partials. Published at cins_off
  // when the Buffer has combine-input slots (zero_copy, the same on every rank).
  int64_t x_in_place, cins_off;
  int zero_copy;
  // The reduce of compact rows stages its loads in shared memory (cp.async) instead of
  // registers: the default where the device grants kCombineReduceSmemBytes per block;
  // DEEP_EP_OPS_COMBINE_SMEM=0 keeps the register path (for A/B runs).
  int reduce_via_smem;
  // bytes of a row in each push warp's shared buffer when compact rows without weights travel
  // by bulk copies (DEEP_EP_OPS_BULK_COPY=1, ep_ops.cpp bulk_rows); 0: off
  int bulk_row_bytes;
  // the reduce's tokens after each warp's first, by ticket (dev::warp_next_ticket; the push
  // kernel resets it)
  unsigned* reduce_ticket;
  Comm comm;
};

// Launchers (defined next to their kernels). They return the launch error, if any.
cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream);
int layout_warps(int E, int R, size_t smem_limit);
cudaError_t launch_dispatch_push(const PushParams& p, int ctas, cudaStream_t stream);
// The pipelined push loop's row stages fit a block's shared memory (opt-in bytes) beside the
// kernel's static part.
bool pipelined_push_fits(size_t smem_optin);
// Counting warps per CTA of the fused compact push (the count's shared memory fits in its
// stages), 0: the count does not fit and the layout kernel counts.
int fused_count_warps(int E, int R);
// The pipelined loop's table of compact bases (ints) fits beside its stages.
bool base_table_fits(size_t smem_optin, int64_t ints);
// Rows moved by bulk copies (DEEP_EP_OPS_BULK_COPY=1): each of a push kernel's kBulkWarps warps
// holds one row in its shared buffer; kBulkStaticReserve bytes of a block's shared memory stay
// for the kernel's static part.
constexpr int kBulkWarps = 16;
constexpr int kBulkStaticReserve = 2048;
cudaError_t launch_local_dispatch(const LocalDispatchParams& p, int ctas, cudaStream_t stream);
cudaError_t launch_dispatch_epilogue(const EpilogueParams& p, int ctas, cudaStream_t stream);
cudaError_t launch_cached_dispatch(const CachedParams& p, int ctas, int epi_ctas,
                                   cudaStream_t stream);
cudaError_t launch_combine(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream);

}  // namespace deep_ep_ops
