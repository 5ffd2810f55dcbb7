// One-time setup kernel: NCCL 2.28 has no host query for a window's peer addresses (it arrives
// in 2.29), so one thread reads every LSA peer's base address on the device.
#include <nccl.h>
#include <nccl_device.h>

#include "launch.hpp"

namespace deep_ep_ops {
namespace {

__global__ void peer_bases_kernel(ncclWindow_t win, int num_ranks, char** out) {
  for (int p = 0; p < num_ranks; ++p) out[p] = static_cast<char*>(ncclGetLsaPointer(win, 0, p));
}

}  // namespace

cudaError_t launch_peer_bases(const void* window, int num_ranks, char** out_device,
                              cudaStream_t stream) {
  peer_bases_kernel<<<1, 1, 0, stream>>>(static_cast<ncclWindow_t>(const_cast<void*>(window)),
                                         num_ranks, out_device);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
