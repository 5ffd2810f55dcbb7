// Peer memory by CUDA IPC: each rank cudaMallocs its region, exports an IPC handle, the handles
// go round the Buffer's process group (gloo or NCCL, through the Python all-gather it passes),
// and every rank opens its peers' handles. Works for any NCCL (or none) and for several ranks
// on one GPU (MPS), where NCCL's LSA team does not cover the group.
#include "peer_memory.hpp"

#include "../host/cuda_check.hpp"

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {
namespace {

// What one rank publishes for one region: its IPC handle and the size it allocated (every rank
// must allocate the same, else an offset valid here is out of bounds there).
struct IpcOffer {
  cudaIpcMemHandle_t handle;
  int64_t bytes;
};

std::string as_bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

class CudaIpcTransport final : public PeerMemoryTransport {
 public:
  CudaIpcTransport(int rank, int num_ranks, int device, BytesAllGather gather)
      : PeerMemoryTransport(rank, num_ranks, device), gather_(std::move(gather)) {
    if (!gather_) throw std::invalid_argument("deep_ep_ops: the IPC transport needs an all-gather");
  }

  PeerRegion allocate(int64_t bytes) override {
    DeviceGuard guard(device_);
    PeerRegion r;
    r.bytes = bytes;
    void* base = nullptr;
    DEO_CUDA(cudaMalloc(&base, static_cast<size_t>(bytes)));
    r.local = static_cast<char*>(base);
    r.peer_base[rank_] = r.local;
    std::string failure;
    IpcOffer offer{};
    offer.bytes = bytes;
    try {
      DEO_CUDA(cudaMemset(base, 0, static_cast<size_t>(bytes)));
      DEO_CUDA(cudaDeviceSynchronize());  // zero before any peer can see it
      DEO_CUDA(cudaIpcGetMemHandle(&offer.handle, base));
    } catch (const std::exception& e) {
      failure = e.what();
    }
    // Every rank takes part in both exchanges whatever happened locally, so one rank's failure
    // becomes an error on every rank instead of a hang in the next collective.
    const auto offers = gather_(failure.empty() ? as_bytes(&offer, sizeof offer) : std::string());
    if (failure.empty()) failure = open_peers(offers, r);
    const auto outcomes = gather_(failure);
    std::string report;
    for (int p = 0; p < num_ranks_; ++p)
      if (p < static_cast<int>(outcomes.size()) && !outcomes[p].empty())
        report += (report.empty() ? "" : "; ") + ("rank " + std::to_string(p) + ": " + outcomes[p]);
    if (!report.empty()) {
      close_peers(r);
      cudaFree(base);
      throw std::runtime_error("deep_ep_ops: setting up CUDA IPC peer memory failed (" + report + ")");
    }
    return r;
  }

  void release(PeerRegion& r) override {
    if (r.local == nullptr) return;
    DeviceGuard guard(device_);
    cudaDeviceSynchronize();  // no kernel or copy of ours still touches a peer's region
    close_peers(r);
    gather_(std::string());   // every rank closed its mappings before any owner frees
    cudaFree(r.local);
    r = PeerRegion{};
  }

  const char* name() const override { return "ipc"; }

 private:
  // Opens every peer's region; returns "" or what went wrong (opened mappings stay in r).
  std::string open_peers(const std::vector<std::string>& offers, PeerRegion& r) {
    if (static_cast<int>(offers.size()) != num_ranks_)
      return "the all-gather returned " + std::to_string(offers.size()) + " offers for " +
             std::to_string(num_ranks_) + " ranks";
    for (int p = 0; p < num_ranks_; ++p) {
      if (p == rank_) continue;
      if (offers[p].size() != sizeof(IpcOffer)) return "rank " + std::to_string(p) + " exported no region";
      IpcOffer peer;
      std::memcpy(&peer, offers[p].data(), sizeof peer);
      if (peer.bytes != r.bytes)
        return "rank " + std::to_string(p) + " allocated " + std::to_string(peer.bytes) +
               " bytes, this rank " + std::to_string(r.bytes) + " (Buffer arguments differ between ranks)";
      void* mapped = nullptr;
      const cudaError_t err = cudaIpcOpenMemHandle(&mapped, peer.handle, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        cudaGetLastError();
        return "cudaIpcOpenMemHandle of rank " + std::to_string(p) + "'s region failed: " +
               cudaGetErrorString(err) + " (are all ranks' processes on this host, with peer access "
               "between their GPUs, or under MPS when they share one?)";
      }
      r.peer_base[p] = static_cast<char*>(mapped);
    }
    return "";
  }

  void close_peers(PeerRegion& r) {
    for (int p = 0; p < num_ranks_; ++p) {
      if (p != rank_ && r.peer_base[p] != nullptr) cudaIpcCloseMemHandle(r.peer_base[p]);
      if (p != rank_) r.peer_base[p] = nullptr;
    }
  }

  BytesAllGather gather_;
};

}  // namespace

std::shared_ptr<PeerMemoryTransport> make_cuda_ipc_transport(int rank, int num_ranks, int device,
                                                             BytesAllGather gather) {
  return std::make_shared<CudaIpcTransport>(rank, num_ranks, device, std::move(gather));
}

}  // namespace deep_ep_ops
