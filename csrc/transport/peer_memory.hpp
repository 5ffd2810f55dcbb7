// Peer memory: one region of device memory per rank that every rank of the group can load from
// and store to (NVLink, or the same GPU). Kernels only ever see base addresses; how a region is
// made and mapped is the transport's business, so the kernels do not change with it.
//
// Two transports: an NCCL symmetric window on the group's own communicator (nccl_window.cu;
// NCCL >= 2.28 with the device API, every rank in one NCCL LSA team), and CUDA IPC
// (cuda_ipc.cpp; cudaMalloc'd memory whose IPC handles go round the Buffer's process group, so
// any NCCL, or none, and several ranks per GPU under MPS).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../device/shared_types.hpp"  // kMaxRanks

namespace deep_ep_ops {

// One collective allocation: this rank's region and every rank's region as mapped here.
struct PeerRegion {
  char* local = nullptr;
  char* peer_base[kMaxRanks] = {};  // peer_base[rank] == local
  int64_t bytes = 0;
  void* record = nullptr;  // the transport's own bookkeeping (an NCCL window, ...)
};

class PeerMemoryTransport {
 public:
  PeerMemoryTransport(int rank, int num_ranks, int device);
  virtual ~PeerMemoryTransport() = default;
  PeerMemoryTransport(const PeerMemoryTransport&) = delete;
  PeerMemoryTransport& operator=(const PeerMemoryTransport&) = delete;

  // Collective: every rank allocates `bytes` zeroed bytes and maps every peer's region. The
  // region is zero on every rank before any peer learns its address.
  virtual PeerRegion allocate(int64_t bytes) = 0;
  // Collective: unmap and free a region of allocate(). No kernel or copy may still use it.
  virtual void release(PeerRegion& region) = 0;
  virtual const char* name() const = 0;

  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }

 protected:
  const int rank_, num_ranks_, device_;
};

// All-gather of one byte string per rank over the Buffer's process group (set-up only; the
// Python side passes a function that calls torch.distributed).
using BytesAllGather = std::function<std::vector<std::string>(const std::string&)>;

std::shared_ptr<PeerMemoryTransport> make_nccl_window_transport(uintptr_t comm_ptr, int rank,
                                                                int num_ranks, int device);
std::shared_ptr<PeerMemoryTransport> make_cuda_ipc_transport(int rank, int num_ranks,
                                                             int device, BytesAllGather gather);

// Whether this build has NCCL's device API (nccl_device.h, NCCL >= 2.28), which the NCCL window
// transport needs; the ranks in this rank's NCCL LSA team (collective on the communicator).
bool nccl_window_supported();
int nccl_lsa_size(uintptr_t comm_ptr);

}  // namespace deep_ep_ops
