// The host's side of the error record GPU waits fill (device/shared_types.hpp): allocation in
// host-mapped memory, reading it, and the one text every host error about it is built from.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../device/shared_types.hpp"
#include "cuda_check.hpp"

namespace deep_ep_ops {

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

// DEEP_EP_OPS_POLL_PAUSE_NS=n: a waiting thread pauses ~n ns between polls of a peer's flag
// (tuning: many CTAs polling without pause may take memory bandwidth from the transfers).
inline unsigned poll_pause_requested() {
  const char* v = std::getenv("DEEP_EP_OPS_POLL_PAUSE_NS");
  if (v == nullptr) return 0;
  const long n = std::strtol(v, nullptr, 10);
  return n > 0 ? static_cast<unsigned>(std::min(n, 1000000L)) : 0;
}

// The wait context of a Buffer's state: a fresh error record (its host address in *host), the
// rank, the timeout, the trap switch and the poll pause. Free with release_wait_context.
inline WaitContext make_wait_context(int rank, double timeout_s, ErrorRecord** host) {
  WaitContext w{};
  *host = alloc_error_record(&w.error);
  w.rank = rank;
  w.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  w.trap_on_timeout = trap_on_timeout_requested();
  w.poll_pause_ns = poll_pause_requested();
  return w;
}

inline void release_wait_context(WaitContext& w, ErrorRecord*& host) {
  cudaFreeHost(host);
  host = nullptr;
  w.error = nullptr;
}

// A consistent copy of the record (the device writes the code last).
inline ErrorRecord read_error_record(const ErrorRecord* record) {
  ErrorRecord out{};
  if (record == nullptr) return out;
  const volatile ErrorRecord* e = record;
  out.code = e->code;
  out.rank = e->rank;
  out.peer = e->peer;
  out.slot = e->slot;
  out.expected = e->expected;
  out.seen = e->seen;
  out.op = e->op;
  return out;
}

// What went wrong, in words ("" for no error): the text of every host exception and of the
// message Python's last_error() returns.
inline std::string describe_failure(const ErrorRecord& e) {
  const std::string who = "rank " + std::to_string(e.rank);
  switch (e.code) {
    case 0:
      return "";
    case kErrTimeout:
      if (e.op == kOpLocalTiles)
        return who + " timed out in " + wait_site_text(e.op) + ": tile " + std::to_string(e.slot) +
               " of its own kernel never counted (call tag " + std::to_string(e.expected) +
               ", saw " + std::to_string(e.seen) + ")";
      return who + " timed out in " + wait_site_text(e.op) + " waiting for peer rank " +
             std::to_string(e.peer) + " (slot " + std::to_string(e.slot) + ", expected " +
             std::to_string(e.expected) + ", saw " + std::to_string(e.seen) + ")";
    case kErrSizeMismatch:
      return who + " expected a pp_send_recv message of " + std::to_string(e.expected) +
             " bytes (recv_shape x recv_dtype) from rank " + std::to_string(e.peer) +
             ", which sent " + std::to_string(e.seen) + " (low 32 bits)";
    case kErrBadIndex: {
      const int64_t value = static_cast<int64_t>(static_cast<uint64_t>(e.expected) |
                                                 (static_cast<uint64_t>(e.seen) << 32));
      return who + ": engram_fetch got index value " + std::to_string(value) +
             ", outside [-1, R*n); its row was returned as zeros";
    }
    default:
      return who + ": error code " + std::to_string(e.code) + " in " + wait_site_text(e.op);
  }
}

// Raises what an earlier call recorded, if it left the ranks out of step (timeout, pp size
// mismatch): the Buffer cannot be used any more, so raising before the launch is right. A bad
// Engram index leaves the protocol intact and is not raised here.
inline void raise_if_broken(const ErrorRecord* record, const char* op) {
  const ErrorRecord e = read_error_record(record);
  if (e.code == 0 || e.code == kErrBadIndex) return;
  throw std::runtime_error(std::string("deep_ep.") + op + ": an earlier call on this Buffer "
                           "failed: " + describe_failure(e) + "; the Buffer cannot be used any "
                           "more");
}

}  // namespace deep_ep_ops
