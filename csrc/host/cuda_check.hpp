// Host-side helpers of every per-Buffer state, the transports and the launch code: CUDA / NCCL
// status checks that throw (Python sees a RuntimeError naming the failing call), a device
// guard that restores the caller's device, and alignment.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {

// The one CUDA status check: throws naming `what` and the CUDA error.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("deep_ep_ops: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

inline int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Raises `kernel`'s dynamic shared-memory limit to all that a block may opt in to beside the
// kernel's static part, and returns that many bytes (0 when a query fails, its error cleared
// so no later launch check reports it). Launchers call it once per kernel (a static), not per
// launch.
inline int raise_dynamic_smem_limit(const void* kernel) {
  int dev = 0, optin = 0;
  cudaFuncAttributes a{};
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  const int dynamic = optin - static_cast<int>(a.sharedSizeBytes);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic) !=
      cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return dynamic;
}

// Whether `stream` is being captured into a CUDA graph (a failed query counts as not).
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(stream, &status);
  return status != cudaStreamCaptureStatusNone;
}

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

}  // namespace deep_ep_ops

// The expression itself is the text of the error.
#define DEO_CUDA(expr) ::deep_ep_ops::check_cuda((expr), #expr)

#define DEO_NCCL(expr)                                                                     \
  do {                                                                                     \
    ncclResult_t res_ = (expr);                                                            \
    if (res_ != ncclSuccess)                                                               \
      throw std::runtime_error(std::string("deep_ep_ops: ") + #expr + " failed: " +       \
                               ncclGetErrorString(res_) + " (" + ncclGetLastError(nullptr) + \
                               ")");                                                       \
  } while (0)
