// Host-side helpers shared by the setup code of every per-Buffer state: CUDA / NCCL status
// checks that throw (Python sees a RuntimeError with the failing call spelled out), a device
// guard that restores the caller's device, and the error record as Python reads it.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
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
