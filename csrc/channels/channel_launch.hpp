// Plain C++ view of the channel launches (pp_send_recv, cp_all_gather / cp_reduce_scatter,
// engram_fetch and its backward): window layout, the by-value view a kernel receives,
// parameter structs and launchers. Host code includes only this header.
//
// These ops keep a peer-memory window of their own (ChannelState), apart from the EP window, so
// the two families never wait on each other's barriers or overwrite each other's staging.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "../device/shared_types.hpp"

namespace deep_ep_ops {

constexpr int kPpMaxChunks = 4;  // a bulk pp message travels in at most this many CE copies

// Flag words at the start of the channel window: uint32 flags[kind][kMaxRanks]. Entry [kind][r] of
// rank q's window is written by rank r (or, for credits, by the rank r that consumed).
enum ChannelFlag : int {
  kFlagPpArrive = 0,  // [src]: last inline message seq from src that landed here
  kFlagPpCredit,      // [dst]: last inline seq that dst consumed (so its ring slot is free)
  kFlagPpBusy,        // [dst]: 1 while this rank's bulk message sits in dst's bulk slot
  kFlagPpSizeLo,      // [src]: byte size of the bulk message src sent (low / high word)
  kFlagPpSizeHi,
  kFlagPpChunk0,      // [src]: 1 once chunk k of src's bulk message landed (kind = Chunk0 + k)
  kFlagCpInline = kFlagPpChunk0 + kPpMaxChunks,  // [r]: inline CP epoch r reached
  kFlagCpReady,       // [r]: bulk CP epoch whose data r staged / pushed
  kFlagCpDone,        // [r]: bulk CP epoch r finished reading
  kFlagEgEnter,       // [r]: engram fetch epoch r entered (its earlier table writes are done)
  kFlagEgDone,        // [r]: engram fetch epoch r finished reading
  kFlagEgStaged,      // [r]: engram scatter-add epoch whose gradients r staged
  kFlagEgSumDone,     // [r]: engram scatter-add epoch r finished reading the stagings
  kNumChannelFlags
};
constexpr int64_t kChannelFlagBytes = 4096;
static_assert(kNumChannelFlags * kMaxRanks * 4 <= kChannelFlagBytes, "channel flags overflow");

// Device-local counters that change from call to call. They live in device memory (never in a
// host variable baked into a launch), so CUDA-graph replays keep counting where the last run
// stopped and stay in step with the peers.
struct ChannelCounters {
  uint32_t pp_sent[kMaxRanks];  // inline messages sent to each dst
  uint32_t pp_recv[kMaxRanks];  // inline messages received from each src
  uint32_t cp_inline_epoch;
  uint32_t cp_epoch;
  uint32_t eg_fetch_epoch;
  uint32_t eg_sum_epoch;
  uint32_t eg_fetch_ticket;  // CTAs of the running fetch that finished (last one resets it)
  uint32_t eg_sum_ticket;
  uint32_t eg_stage_ticket;
  uint32_t pad[9];
};

// Byte offsets in the channel window (the same on every rank).
struct ChannelLayout {
  int64_t pp_ring_off;      // [R src][pp_slots][pp_slot_stride]: header (16 B) + inline payload
  int64_t pp_slot_stride;
  int64_t pp_inline_bytes;  // messages up to this size go through one 1-CTA kernel
  int64_t pp_bulk_off;      // [R src][pp_max_bytes]: one copy-engine slot per source
  int64_t pp_max_bytes;
  int64_t cp_inline_off;    // [2 parities][R][cp_inline_bytes]
  int64_t cp_inline_bytes;
  int64_t cp_bulk_off;      // cp_max_bytes: AG = this rank's slot; RS = R blocks from the peers
  int64_t cp_max_bytes;
  int64_t window_bytes;
  int pp_slots;
  int pad;
};

// What every channel kernel receives by value.
struct ChannelComm {
  char* peer_base[kMaxRanks];  // channel window base of every rank as mapped on this GPU
  ChannelCounters* ctr;        // device-local
  WaitContext wait;            // error record, timeout
  int rank;
  int num_ranks;
};

// ---- pp ----------------------------------------------------------------------------------------
struct PpInlineParams {
  const char* send;
  char* recv;
  int64_t send_bytes, recv_bytes;
  int dst, src;  // -1 = no send / no recv
  ChannelLayout lay;
  ChannelComm comm;
};

enum PpBulkMode : int { kPpAcquire = 0, kPpSignal = 1, kPpWait = 2, kPpRelease = 3 };

struct PpBulkParams {
  int mode;
  int peer;   // dst for acquire/signal, src for wait/release
  int chunk;  // signal / wait
  int pad;
  int64_t bytes;  // whole message: signal of chunk 0 announces it, wait of chunk 0 checks it
  ChannelComm comm;
};

// ---- cp ----------------------------------------------------------------------------------------
enum ChannelDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5 };

struct CpInlineParams {
  const char* x;
  char* out;
  int64_t block_bytes;  // AG: bytes of x; RS: bytes of one output block (x / R)
  int64_t block_elems;  // RS: elements of one block
  int reduce;           // 0 all-gather, 1 reduce-scatter
  int dtype;            // RS: ChannelDtype
  ChannelLayout lay;
  ChannelComm comm;
};

struct CpReduceParams {
  const char* x_block;  // this rank's own block of x
  const char* slots;    // local window: R blocks pushed by the peers, rank order
  char* out;
  int64_t block_elems;
  int64_t block_bytes;
  int dtype;
  int rank, num_ranks;
  int pad;
};

// ---- engram ------------------------------------------------------------------------------------
// A table window: [n rows | count header (256 B) | staged indices int64 [max_rows] |
// staged gradient rows [max_rows][row_bytes]].
struct EngramTableView {
  char* peer_base[kMaxRanks];  // the table window base of every rank as mapped here
  int64_t n;                   // rows per rank
  int64_t row_bytes;
  int64_t count_off, idx_off, rows_off;
  int64_t max_rows;
};

struct EngramFetchParams {
  const void* indices;
  char* out;
  int64_t num_rows;  // N * L
  int idx64;
  int grid;
  EngramTableView t;
  ChannelComm comm;
};

struct EngramStageParams {
  const char* grad;  // [rows][row_bytes]
  const void* indices;
  int64_t num_rows;
  int idx64;
  int grid;
  EngramTableView t;
  ChannelComm comm;
};

struct EngramKeysParams {
  int64_t* keys;  // [R * max_rows]
  EngramTableView t;
  ChannelComm comm;
};

struct EngramSumParams {
  const int64_t* keys;  // sorted
  char* out;            // [n][H] in dtype, zero-filled
  int64_t num_keys;
  int64_t hidden;
  int dtype;
  int grid;
  EngramTableView t;
  ChannelComm comm;
};

// Launchers (defined next to their kernels). They return the launch error, if any.
cudaError_t launch_pp_inline(const PpInlineParams& p, cudaStream_t stream);
cudaError_t launch_pp_bulk(const PpBulkParams& p, cudaStream_t stream);
cudaError_t launch_cp_inline(const CpInlineParams& p, cudaStream_t stream);
cudaError_t launch_cp_sync(const ChannelComm& comm, int flag_kind, int op, bool advance,
                           cudaStream_t stream);
cudaError_t launch_cp_reduce(const CpReduceParams& p, int ctas, cudaStream_t stream);
cudaError_t launch_engram_fetch(const EngramFetchParams& p, cudaStream_t stream);
cudaError_t launch_engram_stage(const EngramStageParams& p, cudaStream_t stream);
cudaError_t launch_engram_keys(const EngramKeysParams& p, cudaStream_t stream);
cudaError_t launch_engram_sum(const EngramSumParams& p, cudaStream_t stream);

}  // namespace deep_ep_ops
