// Host-side helpers shared by the setup code of every per-Buffer state and the transports: CUDA
// / NCCL status checks that throw (Python sees a RuntimeError with the failing call spelled
// out), a device guard that restores the caller's device, and the error record.
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
