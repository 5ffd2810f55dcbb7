// NCCL host-API implementation of the inter-host stage. Only nccl.h's host API: GIN (NCCL's
// device-initiated puts) will be a second InterHostStage, not a change here.
//
// Sizes are whatever the caller passes: on the static wire they are fixed per Buffer, so the
// grouped calls can be captured in a CUDA graph (NCCL supports capture of its p2p calls); on the
// exact wire the caller reads the counts first (counts_to_host) and passes the real sizes.
#include "nccl_rail_stage.hpp"

#include "../host/cuda_check.hpp"

#include <nccl.h>

#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {
namespace {

std::string nccl_text(ncclResult_t res, ncclComm_t comm) {
  std::string text = ncclGetErrorString(res);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') text += std::string(" (") + last + ")";
  return text;
}

class NcclRailStage final : public InterHostStage {
 public:
  NcclRailStage(const std::string& unique_id, const RailPlace& place, int device)
      : InterHostStage(place), device_(device) {
    if (unique_id.size() != sizeof(ncclUniqueId))
      throw std::invalid_argument(
          "deep_ep_ops: inter-host stage on " + place.where() + ": the NCCL unique id has " +
          std::to_string(unique_id.size()) + " bytes, not " + std::to_string(sizeof(ncclUniqueId)) +
          " (rail rank 0, group rank " + std::to_string(place.peer_rank(0)) + ", sent none?)");
    ncclUniqueId id;
    std::memcpy(&id, unique_id.data(), sizeof id);
    DeviceGuard guard(device);
    // The rail communicator: rail rank = host, so the peer on host h' is rail rank h'.
    const ncclResult_t res = ncclCommInitRank(&comm_, place.num_hosts, id, place.host);
    if (res != ncclSuccess)
      throw std::runtime_error("deep_ep_ops: creating the inter-host NCCL communicator of " +
                               place.where() + " over " + std::to_string(place.num_hosts) +
                               " hosts failed: " + nccl_text(res, nullptr) +
                               " (NCCL_SOCKET_IFNAME / NCCL_IB_HCA set for this cluster? "
                               "NCCL_DEBUG=INFO shows why)");
  }

  ~NcclRailStage() override {
    // Not destroyed collectively (an error path, interpreter exit): abort is local and never
    // waits for peers that may be gone.
    if (comm_ != nullptr) ncclCommAbort(comm_);
  }

  void exchange_rows(const char* op, const std::vector<RailPiece>& pieces,
                     cudaStream_t stream) override {
    run_group(op, "rows", pieces, stream);
  }

  void return_partials(const char* op, const std::vector<RailPiece>& pieces,
                       cudaStream_t stream) override {
    run_group(op, "partials", pieces, stream);
  }

  void exchange_counts(const char* op, const int64_t* send_counts, int64_t* recv_counts,
                       cudaStream_t stream) override {
    std::vector<RailPiece> pieces;
    for (int h = 0; h < place.num_hosts; ++h)
      if (h != place.host)
        pieces.push_back({h, send_counts + h, sizeof(int64_t), recv_counts + h, sizeof(int64_t)});
    run_group(op, "counts", pieces, stream);
  }

  void destroy() override {
    std::lock_guard<std::mutex> lock(calls_);
    if (comm_ == nullptr) return;  // destroyed, or aborted: nothing left to finalize
    DeviceGuard guard(device_);
    ncclComm_t comm = comm_;
    comm_ = nullptr;  // whatever happens below, the destructor must not touch it again
    alive_ = false;
    // Finalize flushes what is still in flight on the rail (collective), destroy frees.
    const ncclResult_t fin = ncclCommFinalize(comm);
    if (fin != ncclSuccess) {
      const std::string text = nccl_text(fin, comm);
      ncclCommAbort(comm);
      throw std::runtime_error("deep_ep_ops: finalizing the inter-host NCCL communicator of " +
                               place.where() + " failed: " + text);
    }
    // no communicator for the error text: it is gone whether or not destroy succeeded
    check(ncclCommDestroy(comm), "ncclCommDestroy", "destroy", -1, nullptr);
  }

  const char* name() const override { return "nccl"; }

 protected:
  void abort_transport() override {
    DeviceGuard guard(device_);
    // NCCL's kernels poll the communicator's abort flag, so the pending transfers end (the
    // call PyTorch's NCCL watchdog makes from its own thread)
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  // One grouped call: every piece's send and receive, so NCCL matches them with the peers'
  // pieces in order and no pair waits on another.
  void run_group(const char* op, const char* what, const std::vector<RailPiece>& pieces,
                 cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(calls_);
    check_alive(op);
    check_pieces(op, pieces);
    check_async(op);
    DeviceGuard guard(device_);
    check(ncclGroupStart(), "ncclGroupStart", op, -1, comm_);
    std::string failure;
    for (const RailPiece& p : pieces) {
      // Every piece posts both directions, zero bytes included: skipping one side of a pair
      // on one rank only would leave its peer waiting.
      const ncclResult_t s = ncclSend(p.send, static_cast<size_t>(p.send_bytes), ncclUint8,
                                      p.host, comm_, stream);
      if (s != ncclSuccess) {
        failure = describe(op, "ncclSend of the " + std::string(what), p.host, s);
        break;
      }
      const ncclResult_t r = ncclRecv(p.recv, static_cast<size_t>(p.recv_bytes), ncclUint8,
                                      p.host, comm_, stream);
      if (r != ncclSuccess) {
        failure = describe(op, "ncclRecv of the " + std::string(what), p.host, r);
        break;
      }
    }
    // The group must be closed even after a failed call, else the next NCCL call on this
    // thread would join it.
    const ncclResult_t end = ncclGroupEnd();
    if (!failure.empty()) throw std::runtime_error(failure);
    if (end != ncclSuccess)
      throw std::runtime_error(describe(op, std::string("ncclGroupEnd of the ") + what + " to " +
                                                peers_text(pieces), -1, end));
  }

  // A peer that failed or a network error shows up here, not in the call that enqueued.
  void check_async(const char* op) {
    ncclResult_t state = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError", op, -1, comm_);
    if (state != ncclSuccess)
      throw std::runtime_error(describe(op, "the inter-host communicator (an earlier transfer)",
                                        -1, state));
  }

  void check(ncclResult_t res, const char* call, const char* op, int peer_host, ncclComm_t comm) {
    if (res != ncclSuccess) throw std::runtime_error(describe(op, call, peer_host, res, comm));
  }

  std::string describe(const char* op, const std::string& call, int peer_host, ncclResult_t res,
                       ncclComm_t comm = nullptr) const {
    std::string text = std::string("deep_ep.") + op + ": " + call + " failed on " + place.where();
    if (peer_host >= 0) text += " with " + place.peer(peer_host);
    return text + ": " + nccl_text(res, comm ? comm : comm_);
  }

  std::string peers_text(const std::vector<RailPiece>& pieces) const {
    std::string text;
    for (const RailPiece& p : pieces) {
      const std::string one = place.peer(p.host);
      if (text.find(one) == std::string::npos) text += (text.empty() ? "" : ", ") + one;
    }
    return text.empty() ? "no peer" : text;
  }

  const int device_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

std::string nccl_rail_unique_id() {
  ncclUniqueId id;
  const ncclResult_t res = ncclGetUniqueId(&id);
  if (res != ncclSuccess)
    throw std::runtime_error(std::string("deep_ep_ops: ncclGetUniqueId for the inter-host "
                                         "communicator failed: ") + nccl_text(res, nullptr));
  return std::string(reinterpret_cast<const char*>(&id), sizeof id);
}

std::shared_ptr<InterHostStage> make_nccl_rail_stage(const std::string& unique_id,
                                                     const RailPlace& place, int device) {
  return std::make_shared<NcclRailStage>(unique_id, place, device);
}

}  // namespace deep_ep_ops
