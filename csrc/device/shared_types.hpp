// Plain types that host and device code of every op family share: the group limits, the
// host-mapped error record, and the one table of GPU waits that can fail. Every error text about
// a wait (printed by a kernel, raised by the host, returned to Python) takes its words from
// wait_site_text(), so the three cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DEO_HOST_DEVICE __host__ __device__
#else
#define DEO_HOST_DEVICE
#endif

namespace deep_ep_ops {

constexpr int kMaxRanks = 32;  // destination masks are 32-bit words
constexpr int kMaxTopk = 32;

// Written by the first GPU wait that fails (host-mapped, so it survives a trap that follows and
// the host can say which peer stalled), read by the host at the next call.
struct ErrorRecord {
  int code;  // ErrorCode; 0 = none
  int rank;
  int peer;
  int slot;
  unsigned expected;
  unsigned seen;
  int op;  // OpId of the wait
  int pad;
};

enum ErrorCode : int {
  kErrTimeout = 1,
  kErrBadIndex = 2,      // engram_fetch saw an index outside [-1, R*n): expected/seen = the value
  kErrSizeMismatch = 3,  // pp receiver expected `expected` bytes (low words), sender sent `seen`
};

// Every wait that can time out: (enum name, id, what it waits for).
#define DEEP_EP_OPS_WAIT_SITES(X)                                                       \
  X(kOpDispatchLayout, 1, "dispatch (count exchange)")                                  \
  X(kOpDispatchPush, 2, "dispatch (data push)")                                         \
  X(kOpCachedStage, 3, "cached_dispatch (staging)")                                     \
  X(kOpCachedPull, 4, "cached_dispatch (pull)")                                         \
  X(kOpCombinePush, 5, "combine (push)")                                                \
  X(kOpLocalTiles, 6, "dispatch (one rank: a tile's count)")                            \
  X(kOpPpInlineSend, 21, "pp_send_recv (inline send: waiting for a free slot)")         \
  X(kOpPpInlineRecv, 22, "pp_send_recv (inline recv: waiting for the message)")         \
  X(kOpPpBulkSend, 23, "pp_send_recv (bulk send: waiting for the slot)")                \
  X(kOpPpBulkRecv, 24, "pp_send_recv (bulk recv: waiting for the message)")             \
  X(kOpCpInline, 25, "cp_all_gather/cp_reduce_scatter (inline)")                        \
  X(kOpCpReady, 26, "cp_all_gather/cp_reduce_scatter (data ready)")                     \
  X(kOpCpDone, 27, "cp_all_gather/cp_reduce_scatter (reads done)")                      \
  X(kOpEgEnter, 28, "engram_fetch (entry)")                                             \
  X(kOpEgDone, 29, "engram_fetch (reads done)")                                         \
  X(kOpEgStaged, 30, "engram backward (gradients staged)")                              \
  X(kOpEgSumDone, 31, "engram backward (reads done)")

enum OpId : int {
#define DEO_OP_ENUM(name, id, text) name = id,
  DEEP_EP_OPS_WAIT_SITES(DEO_OP_ENUM)
#undef DEO_OP_ENUM
};

DEO_HOST_DEVICE inline const char* wait_site_text(int op) {
  switch (op) {
#define DEO_OP_CASE(name, id, text) \
  case id:                          \
    return text;
    DEEP_EP_OPS_WAIT_SITES(DEO_OP_CASE)
#undef DEO_OP_CASE
    default:
      return "an unknown wait";
  }
}

// What every GPU wait needs besides its flag: where a failure is recorded, who waits, how long.
// Filled at Buffer set-up; each family's by-value kernel view carries one.
struct WaitContext {
  ErrorRecord* error;  // host-mapped
  unsigned long long timeout_ns;
  int rank;
  int trap_on_timeout;  // DEEP_EP_OPS_TRAP_ON_TIMEOUT=1: __trap() after reporting
  unsigned poll_pause_ns;  // DEEP_EP_OPS_POLL_PAUSE_NS: pause between polls of a flag (0: none)
};

}  // namespace deep_ep_ops
