// Per-Buffer state of the channel ops (pp / cp / engram): a peer-memory window of their own from
// the Buffer's transport (flags, pp slots, cp staging), device counters, a host-mapped error record,
// the Engram table windows and the events used to fork copies onto side streams. No torch types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "channel_launch.hpp"
#include "../transport/peer_memory.hpp"

namespace deep_ep_ops {

struct ChannelConfig {
  int rank, num_ranks, device;
  double timeout_s;
  int64_t pp_max_bytes;     // largest pp message (bulk slot per source rank)
  int64_t pp_inline_bytes;  // messages up to this size: one 1-CTA kernel
  int pp_slots;             // inline messages in flight per direction
  int64_t cp_max_bytes;     // largest cp input (all-gather: per rank; reduce-scatter: whole x)
  int64_t cp_inline_bytes;  // cp blocks up to this size: one 1-CTA kernel
};

// One registered Engram table (+ the staging of its backward) in its own window.
struct EngramTable {
  PeerRegion window;  // the torch tensor views its first n*row_bytes
  EngramTableView view{};
};

class ChannelState {
 public:
  ChannelState(const ChannelConfig& cfg, std::shared_ptr<PeerMemoryTransport> transport);
  ~ChannelState();
  ChannelState(const ChannelState&) = delete;
  ChannelState& operator=(const ChannelState&) = delete;

  // Collective: every rank of the group calls it (window release), tables included.
  void destroy();
  bool alive() const { return window_.local != nullptr; }

  // Collective: allocate a table window; returns the table.
  EngramTable& add_engram_table(int64_t n, int64_t row_bytes, int64_t max_rows);
  const EngramTable* engram_table() const { return tables_.empty() ? nullptr : &tables_.back(); }

  char* local_base() const { return window_.local; }
  cudaEvent_t event(int i) const { return events_[i]; }

  static constexpr int kNumEvents = 16;
  const ChannelConfig cfg;
  ChannelComm comm{};
  ChannelLayout lay{};
  ErrorRecord* error_host = nullptr;  // same memory as comm.wait.error
  int sm_count = 0;

 private:
  std::shared_ptr<PeerMemoryTransport> transport_;
  PeerRegion window_;
  std::vector<EngramTable> tables_;
  cudaEvent_t events_[kNumEvents] = {};
};

}  // namespace deep_ep_ops
