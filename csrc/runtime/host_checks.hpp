// Host-side helpers shared by the setup code of every per-Buffer state: CUDA / NCCL status
// checks that throw (Python sees a RuntimeError with the failing call spelled out), a device
// guard that restores the caller's device, symmetric-window registration, and the error record.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/launch.hpp"

#define DEO_CUDA(expr)                                                                     \
  do {                                                                                     \
    cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("deep_ep_ops: ") + #expr + " failed: " +       \
                               cudaGetErrorString(err_));                                  \
  } while (0)

#define DEO_NCCL(expr)                                                                     \
  do {                                                                                     \
    ncclResult_t res_ = (expr);                                                            \
    if (res_ != ncclSuccess)                                                               \
      throw std::runtime_error(std::string("deep_ep_ops: ") + #expr + " failed: " +       \
                               ncclGetErrorString(res_) + " (" + ncclGetLastError(nullptr) + \
                               ")");                                                       \
  } while (0)

namespace deep_ep_ops {

inline int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Setup must not change the current device behind torch's back.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// Collective over the communicator: `bytes` of zeroed symmetric memory registered as one window;
// every rank's address of it (as mapped here) goes to peer_bases[0..num_ranks). NCCL 2.28 has no
// host query of a window's peer addresses, so a setup kernel reads them into `scratch_dev`
// (device memory for num_ranks pointers). Zeroed: flags start at 0 and tables read as zeros.
inline void register_symmetric_window(uintptr_t comm_ptr, int num_ranks, int64_t bytes,
                                      char** scratch_dev, void** base, void** window,
                                      char** peer_bases) {
  auto comm = reinterpret_cast<ncclComm_t>(comm_ptr);
  DEO_NCCL(ncclMemAlloc(base, static_cast<size_t>(bytes)));
  DEO_CUDA(cudaMemset(*base, 0, static_cast<size_t>(bytes)));
  DEO_CUDA(cudaDeviceSynchronize());
  ncclWindow_t win = nullptr;
  DEO_NCCL(ncclCommWindowRegister(comm, *base, static_cast<size_t>(bytes), &win,
                                  NCCL_WIN_COLL_SYMMETRIC));
  *window = win;
  DEO_CUDA(launch_peer_bases(win, num_ranks, scratch_dev, nullptr));
  DEO_CUDA(cudaMemcpy(peer_bases, scratch_dev, sizeof(char*) * num_ranks,
                      cudaMemcpyDeviceToHost));
  for (int p = 0; p < num_ranks; ++p)
    if (peer_bases[p] == nullptr)
      throw std::runtime_error("deep_ep_ops: NCCL returned no window address for rank " +
                               std::to_string(p));
}

// A zeroed error record in host-mapped memory: GPU waits write it (it survives a trap) and the
// host reads it at the next call. Returns the host address; *device_view is the same memory
// as kernels address it. Free with cudaFreeHost.
inline ErrorRecord* alloc_error_record(ErrorRecord** device_view) {
  ErrorRecord* host = nullptr;
  DEO_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(ErrorRecord),
                         cudaHostAllocMapped));
  std::memset(host, 0, sizeof(ErrorRecord));
  DEO_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(device_view), host, 0));
  return host;
}

// DEEP_EP_OPS_TRAP_ON_TIMEOUT=1: a timed-out GPU wait traps after reporting (kills the context).
inline int trap_on_timeout_requested() {
  const char* trap = std::getenv("DEEP_EP_OPS_TRAP_ON_TIMEOUT");
  return (trap != nullptr && trap[0] == '1') ? 1 : 0;
}

// (code, rank, peer, slot, expected, seen, op) of a host-mapped error record; code 0 = none.
inline std::vector<int64_t> error_record_fields(const ErrorRecord* record) {
  std::vector<int64_t> out(7, 0);
  if (record == nullptr) return out;
  const volatile ErrorRecord* e = record;
  out[0] = e->code;
  out[1] = e->rank;
  out[2] = e->peer;
  out[3] = e->slot;
  out[4] = e->expected;
  out[5] = e->seen;
  out[6] = e->op;
  return out;
}

}  // namespace deep_ep_ops
