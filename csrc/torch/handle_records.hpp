// Host-side records of the routing handles the C++ CUDA kernels made, so combine and
// cached_dispatch can check a handle's header (its Buffer, T and C) on the host without reading
// it back from the GPU (a device-to-host sync on every call).
//
// A record is keyed by the handle's StorageImpl and holds a weak reference to it: while the
// record exists that StorageImpl object is not freed, so its address cannot be taken by another
// storage, and a dead storage (the handle was freed) never matches. A lookup also requires the
// same view (storage offset, sizes, contiguous), the same data pointer and the same version
// counter value as when recorded, so a slice of the handle, a storage whose memory was swapped,
// or a handle written in place since (handle[0, 9] = ...) is "not recorded", and the caller
// falls back to reading the header (DEEP_EP_OPS_VALIDATE=1) or no check, as before records.
// Not seen: writes that bypass torch's version counter (a raw kernel, an inference tensor
// written inside inference mode).
//
// Safe under CUDA graph capture (no CUDA call; the record made while capturing describes the
// static handle every replay rewrites with the same header) and under torch.compile (fake
// tensors never reach these kernels). Thread-safe (one mutex). Torch-only: also built without
// CUDA (tests/test_handle_records_cpu.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>

#include "handle_checks.hpp"  // HandleFacts

namespace deep_ep_ops {

// Remember `handle` (just returned by a dispatch) as carrying `facts`. Replaces any record of
// the same storage. Prunes records of freed handles when the table has grown.
void record_handle(const at::Tensor& handle, const HandleFacts& facts);

// The facts of `handle` if it is a recorded handle, alive, and the very view recorded.
std::optional<HandleFacts> recorded_handle(const at::Tensor& handle);

// exact=True: `trimmed` is `static_handle` with only the receive rows in use (trim.py). It
// inherits the static handle's record with C = its own rows - 1 - T. False (nothing recorded)
// when the static handle has no record or `trimmed` cannot be its trim.
bool record_trimmed_handle(const at::Tensor& static_handle, const at::Tensor& trimmed);

// Records in the table, dead ones not yet pruned included (tests).
size_t handle_record_count();

}  // namespace deep_ep_ops
