// Per-Buffer CUDA state: the NCCL symmetric window on the group's own communicator, the peers'
// window addresses, device scratch and the host-mapped error record. No torch types here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../kernels/launch.hpp"

namespace deep_ep_ops {

struct StateConfig {
  uintptr_t comm_ptr;  // ncclComm_t borrowed from ProcessGroupNCCL
  int rank, num_ranks;
  int max_tokens, hidden, topk, num_experts;
  bool fp8;
  double timeout_s;
  int device;
};

class State {
 public:
  explicit State(const StateConfig& cfg);
  ~State();
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  // Collective: every rank of the group must call it (window deregistration).
  void destroy();
  bool alive() const { return window_ != nullptr; }

  const StateConfig cfg;
  Comm comm{};
  DispatchScratch scratch{};
  int64_t data_bytes = 0;  // size of the data region
  int64_t window_bytes = 0;
  int sm_count = 0;
  size_t smem_optin = 0;
  int handle_width = 0;
  ErrorRecord* error_host = nullptr;  // same memory as comm.error
  int* pinned_counts = nullptr;       // exact mode: recv_info head copied back to the host

 private:
  void* base_ = nullptr;
  void* window_ = nullptr;  // ncclWindow_t
  void* dev_comm_ = nullptr;  // ncclDevComm (heap, the type stays out of this header)
  void* scratch_block_ = nullptr;
  char** peer_bases_dev_ = nullptr;
};

}  // namespace deep_ep_ops
