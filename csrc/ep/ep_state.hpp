// Per-Buffer CUDA state of dispatch / cached_dispatch / combine: a peer-memory window (from the
// Buffer's transport), the peers' window addresses, device scratch and the host-mapped error
// record. No torch types here.
#pragma once

#include <cstddef>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "ep_launch.hpp"
#include "ep_window.hpp"
#include "output_slots.hpp"
#include "../transport/peer_memory.hpp"

namespace deep_ep_ops {

struct EpConfig {
  int buffer_id;  // Buffer.id, stamped into every handle (handle.py HDR_BUFFER_ID)
  int rank, num_ranks;
  int max_tokens, hidden, topk, num_experts;
  bool fp8;
  double timeout_s;
  int device;
  int direct_slots;  // Buffer(direct_outputs=N): dispatch outputs that peers write directly
  bool zero_copy_combine;  // Buffer(zero_copy_combine=True): combine inputs peers read in place
};

class EpState {
 public:
  EpState(const EpConfig& cfg, std::shared_ptr<PeerMemoryTransport> transport);
  ~EpState();
  EpState(const EpState&) = delete;
  EpState& operator=(const EpState&) = delete;

  // Collective: every rank of the group must call it (the transport releases the window).
  void destroy();
  bool alive() const { return window_.local != nullptr; }
  const char* transport_name() const { return transport_->name(); }

  const EpConfig cfg;
  Comm comm{};
  DispatchScratch scratch{};
  EpWindow win;  // where everything lives in the window
  int sm_count = 0;
  size_t smem_optin = 0;
  int cc_major = 0;  // compute capability (bulk copies need 9)
  int handle_width = 0;
  ErrorRecord* error_host = nullptr;  // same memory as comm.wait.error
  // shared with the deleters of the output tensors that live in the slots (they may outlive
  // the state)
  std::shared_ptr<OutputSlots> slots;
  // combine-input slots: the next one buf.combine_input() hands out; how the combines with
  // more than one rank made their partials available (read in place by the peers, or pushed)
  std::atomic<int> next_cin{0};
  std::atomic<int> cin_pending{-1};  // the slot handed out last, until a combine takes it
  std::atomic<int64_t> combine_in_place{0}, combine_pushed{0};
  // dispatches with more than one rank whose push fanned rows out by bulk copies, and the others;
  // of the others, those that took the pipelined compact loop
  std::atomic<int64_t> dispatch_bulk{0}, dispatch_register{0}, dispatch_pipelined{0};
  std::atomic<int64_t> dispatch_fused{0};  // of those, the ones that counted in the push (no layout kernel)
  // dispatches whose peers wrote their routing outputs into its direct-output slot (no epilogue)
  std::atomic<int64_t> dispatch_direct_routing{0};
  // dispatches whose pipelined push sent its last tokens in halves (PushParams::split_tail)
  std::atomic<int64_t> dispatch_split_tail{0};
  // dispatches whose count blocks wrote the routing rows (LayoutParams::block_routing)
  std::atomic<int64_t> dispatch_routing_by_count{0};
  int last_push_ctas = 0;  // grid of the last push kernel with more than one rank (push_times)

 private:
  std::shared_ptr<PeerMemoryTransport> transport_;
  PeerRegion window_;
  void* scratch_block_ = nullptr;
};

}  // namespace deep_ep_ops
