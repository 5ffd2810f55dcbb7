// Peer memory as an NCCL symmetric window on the group's own communicator (ncclMemAlloc +
// ncclCommWindowRegister). Needs NCCL's device API (>= 2.28) and every rank of the group in one
// NCCL LSA team (load/store peers). Compiled by nvcc for the one setup kernel: NCCL 2.28 has no
// host query of a window's peer addresses (2.29 adds one), so a thread reads them on the device.
#include "peer_memory.hpp"

#include "../host/cuda_check.hpp"

#include <nccl.h>

#if __has_include(<nccl_device.h>)
#include <nccl_device.h>
#define DEO_HAVE_NCCL_DEVICE_API 1
#else
#define DEO_HAVE_NCCL_DEVICE_API 0
#endif

#include <stdexcept>
#include <string>

namespace deep_ep_ops {

#if DEO_HAVE_NCCL_DEVICE_API
namespace {

__global__ void window_peer_bases_kernel(ncclWindow_t win, int num_ranks, char** out) {
  for (int p = 0; p < num_ranks; ++p) out[p] = static_cast<char*>(ncclGetLsaPointer(win, 0, p));
}

// The device API has no ABI stability before 2.29/2.31: headers and library must match.
void check_runtime_matches_headers() {
  int version = 0;
  DEO_NCCL(ncclGetVersion(&version));
  if (version != NCCL_VERSION_CODE)
    throw std::runtime_error("deep_ep_ops: built against NCCL " +
                             std::to_string(NCCL_VERSION_CODE) + " but the loaded libnccl is " +
                             std::to_string(version) + "; rebuild (clear DEEP_EP_OPS_CACHE) or "
                             "use transport=\"ipc\"");
}

class NcclWindowTransport final : public PeerMemoryTransport {
 public:
  NcclWindowTransport(uintptr_t comm_ptr, int rank, int num_ranks, int device)
      : PeerMemoryTransport(rank, num_ranks, device), comm_(reinterpret_cast<ncclComm_t>(comm_ptr)) {
    if (comm_ == nullptr) throw std::invalid_argument("deep_ep_ops: the NCCL communicator is null");
    check_runtime_matches_headers();
    const int lsa = ncclTeamLsa(comm_).nRanks;
    if (lsa != num_ranks)
      throw std::invalid_argument(
          "deep_ep_ops: transport \"nccl\" needs every rank of the group to be a load/store "
          "(NVLink/P2P) peer on one host, but NCCL's LSA team holds " + std::to_string(lsa) +
          " of the group's " + std::to_string(num_ranks) + " ranks (the group spans hosts, or "
          "ranks share a GPU); use transport=\"ipc\" for ranks of one host");
    DeviceGuard guard(device);
    DEO_CUDA(cudaMalloc(&peer_tmp_, sizeof(char*) * kMaxRanks));
  }
  ~NcclWindowTransport() override { cudaFree(peer_tmp_); }

  PeerRegion allocate(int64_t bytes) override {
    DeviceGuard guard(device_);
    PeerRegion r;
    r.bytes = bytes;
    void* base = nullptr;
    DEO_NCCL(ncclMemAlloc(&base, static_cast<size_t>(bytes)));
    DEO_CUDA(cudaMemset(base, 0, static_cast<size_t>(bytes)));
    DEO_CUDA(cudaDeviceSynchronize());
    ncclWindow_t win = nullptr;
    DEO_NCCL(ncclCommWindowRegister(comm_, base, static_cast<size_t>(bytes), &win,
                                    NCCL_WIN_COLL_SYMMETRIC));
    window_peer_bases_kernel<<<1, 1>>>(win, num_ranks_, peer_tmp_);
    DEO_CUDA(cudaGetLastError());
    DEO_CUDA(cudaMemcpy(r.peer_base, peer_tmp_, sizeof(char*) * num_ranks_,
                        cudaMemcpyDeviceToHost));
    for (int p = 0; p < num_ranks_; ++p)
      if (r.peer_base[p] == nullptr)
        throw std::runtime_error("deep_ep_ops: NCCL returned no window address for rank " +
                                 std::to_string(p));
    r.local = static_cast<char*>(base);
    r.record = win;
    return r;
  }

  void release(PeerRegion& r) override {
    if (r.local == nullptr) return;
    DeviceGuard guard(device_);
    cudaDeviceSynchronize();
    ncclCommWindowDeregister(comm_, static_cast<ncclWindow_t>(r.record));
    ncclMemFree(r.local);
    r = PeerRegion{};
  }

  const char* name() const override { return "nccl"; }

 private:
  ncclComm_t comm_;
  char** peer_tmp_ = nullptr;  // device scratch of the peer-address kernel
};

}  // namespace

bool nccl_window_supported() { return true; }

int nccl_lsa_size(uintptr_t comm_ptr) {
  if (comm_ptr == 0) throw std::invalid_argument("deep_ep_ops: the NCCL communicator is null");
  return ncclTeamLsa(reinterpret_cast<ncclComm_t>(comm_ptr)).nRanks;
}

std::shared_ptr<PeerMemoryTransport> make_nccl_window_transport(uintptr_t comm_ptr, int rank,
                                                                int num_ranks, int device) {
  return std::make_shared<NcclWindowTransport>(comm_ptr, rank, num_ranks, device);
}

#else  // NCCL without the device API

bool nccl_window_supported() { return false; }

int nccl_lsa_size(uintptr_t) { return 0; }

std::shared_ptr<PeerMemoryTransport> make_nccl_window_transport(uintptr_t, int, int, int) {
  throw std::invalid_argument("deep_ep_ops: transport \"nccl\" needs NCCL >= 2.28 with the "
                              "device API (nccl_device.h); this build has NCCL " +
                              std::to_string(NCCL_VERSION_CODE) + ". Use transport=\"ipc\"");
}

#endif

}  // namespace deep_ep_ops
