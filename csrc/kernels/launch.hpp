// Plain C++ view of every kernel launch: parameter structs and launch functions. Host code
// (csrc/runtime) includes only this header, so torch headers and CUDA device code never meet in
// one translation unit (faster JIT builds, no template clashes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "handle_layout.hpp"

namespace deep_ep_ops {

constexpr int kMaxRanks = 32;              // destination masks are 32-bit words
constexpr int kNumSlots = 256;             // barrier slots; CTA b of a barrier kernel uses slot b
constexpr int kLayoutSlot = kNumSlots - 1; // the one-CTA count exchange of dispatch
constexpr int kMaxBarrierCtas = kNumSlots - 1;
constexpr int kMaxTopk = 32;

// Filled by the first GPU wait that times out (host-mapped, so it survives the trap that
// follows and the host can say which peer stalled).
struct ErrorRecord {
  int code;  // 0 = none, 1 = timeout
  int rank;
  int peer;
  int slot;
  unsigned expected;
  unsigned seen;
  int op;
  int pad;
};

enum OpId : int {
  kOpDispatchLayout = 1,
  kOpDispatchPush = 2,
  kOpCachedStage = 3,
  kOpCachedPull = 4,
  kOpCombinePush = 5,
};

// Window layout (the same byte offsets on every rank):
//   [flags_off]  uint32 flags[kNumSlots][kMaxRanks]: flags[b][s] = last barrier epoch that rank s
//                announced to this rank on slot b
//   [counts_off] int32 counts[R][E + R]: row s = rank s's per-expert and per-rank send counts
//   [data_off]   dispatch rows / cached-dispatch staging / combine staging (reused by every op;
//                each op starts behind a barrier so peers are done with the previous one)
struct Comm {
  char* peer_base[kMaxRanks];  // window base address of every rank as mapped here
  unsigned* epochs;            // device-local epoch per barrier slot (graph-replay safe)
  ErrorRecord* error;          // host-mapped error record
  long long timeout_cycles;
  int trap_on_timeout;  // DEEP_EP_OPS_TRAP_ON_TIMEOUT=1: __trap() after reporting
  int rank;
  int num_ranks;
  int64_t flags_off;
  int64_t counts_off;
  int64_t data_off;
};

// Per-Buffer device scratch for dispatch (sized for M tokens at setup).
struct DispatchScratch {
  unsigned* tok_dmask;  // [M] destination-rank mask of each token
  int* tok_exprank;     // [M*K] rank of (t, k) among this warp's tokens of the same expert
  int* tok_dstrank;     // [M*K] rank of t among this warp's tokens sent to slot k's rank
  int* rowc;            // [M*R] compact row at each destination rank (-1 = not sent)
  int* rowe;            // [M*K] expert-major row at the destination for slot k (-1 = none)
  int* send_handle;     // [(1+M)*W] header + send part, copied into the handle by the epilogue
  int* recv_info;       // kRecvInfo* fields, then tokens_per_expert[E_loc], block_start[E_loc+1]
};
constexpr int kRecvG = 0;           // groups (compact rows) received
constexpr int kRecvPairs = 1;       // (token, local expert) pairs received
constexpr int kRecvAligned = 2;     // sum of aligned per-expert counts
constexpr int kRecvTpe = 8;         // offset of tokens_per_expert

// Row layout of dispatch in the data region: x rows, scale rows and metadata rows, each for
// R*M compact rows. Metadata ints: [src rank, src token, combine slot, 0,
// local expert of slot k (K), expert-major row of slot k (K), weight bits of slot k (K)].
struct DispatchRows {
  int64_t x_off, s_off, m_off;  // offsets from the window base
  int64_t x_stride, s_stride;   // bytes
  int meta_ints;                // ints per metadata row
};

struct LayoutParams {
  const void* topk_idx;
  int idx64;
  int T, K, E, E_loc, A, M, expand, W;
  int warps, chunk;  // warps of the one CTA; tokens per warp (multiple of 32)
  DispatchScratch s;
  Comm comm;
};

struct PushParams {
  const char* x;
  const char* scales;
  const void* topk_idx;
  const float* topk_weights;
  int idx64;
  int64_t x_bytes, s_bytes;  // per row
  int T, K, E_loc, expand;
  DispatchRows rows;
  DispatchScratch s;
  Comm comm;
};

struct EpilogueParams {
  const char* win;  // local window base
  DispatchRows rows;
  const int* recv_info;
  const int* send_handle;
  char* recv_x;
  char* recv_s;
  void* recv_idx;  // int64 [C, K] compact, int32 [C] expand
  float* recv_w;
  int* tpe;
  int* handle;
  int64_t x_bytes, s_bytes;
  int C, T, K, W, E_loc, expand;
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
  Comm comm;
};

// Launchers (defined next to their kernels). They return the launch error, if any.
cudaError_t launch_peer_bases(const void* window, int num_ranks, char** out_device,
                              cudaStream_t stream);
cudaError_t launch_layout(const LayoutParams& p, cudaStream_t stream);
int layout_warps(int E, int R, size_t smem_limit);
size_t layout_smem_bytes(int warps, int E, int R);
cudaError_t launch_dispatch_push(const PushParams& p, int ctas, cudaStream_t stream);
cudaError_t launch_dispatch_epilogue(const EpilogueParams& p, int ctas, cudaStream_t stream);
cudaError_t launch_cached_dispatch(const CachedParams& p, int ctas, int epi_ctas,
                                   cudaStream_t stream);
cudaError_t launch_combine(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream);

}  // namespace deep_ep_ops
