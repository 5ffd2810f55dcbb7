// The transport-independent parts of the inter-host stage: places, piece checks, and the exact
// wire's count read (the same for NCCL and, later, GIN).
#include "rail_stage.hpp"

#include "../host/cuda_check.hpp"

#include <mutex>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {

std::string RailPlace::where() const {
  return "rank " + std::to_string(rank) + " (host " + std::to_string(host) + ", local index " +
         std::to_string(local) + ")";
}

std::string RailPlace::peer(int peer_host) const {
  return "host " + std::to_string(peer_host) + " (rail peer rank " +
         std::to_string(peer_rank(peer_host)) + ")";
}

RailPlace make_rail_place(int rank, int num_hosts, int ranks_per_host) {
  if (num_hosts < 1 || ranks_per_host < 1 || rank < 0 || rank >= num_hosts * ranks_per_host)
    throw std::invalid_argument(
        "deep_ep_ops: inter-host stage: rank " + std::to_string(rank) + " is not in a group of " +
        std::to_string(num_hosts) + " hosts of " + std::to_string(ranks_per_host) + " ranks");
  RailPlace p;
  p.rank = rank;
  p.host = rank / ranks_per_host;
  p.local = rank % ranks_per_host;
  p.num_hosts = num_hosts;
  p.ranks_per_host = ranks_per_host;
  return p;
}

void InterHostStage::check_alive(const char* op) const {
  if (!abort_reason_.empty())
    throw std::runtime_error(std::string("deep_ep.") + op + ": the inter-host stage of " +
                             place.where() + " was aborted after a stall (" + abort_reason_ +
                             "); destroy this Buffer and the process group");
  if (!alive())
    throw std::runtime_error(std::string("deep_ep.") + op + ": the inter-host stage of " +
                             place.where() + " was destroyed");
}

bool InterHostStage::abort(const std::string& reason) {
  std::unique_lock<std::mutex> lock(calls_, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  if (!alive()) return true;
  abort_transport();
  abort_reason_ = reason;
  alive_ = false;
  return true;
}

void InterHostStage::check_pieces(const char* op, const std::vector<RailPiece>& pieces) const {
  for (const RailPiece& p : pieces) {
    const std::string at = std::string("deep_ep.") + op + ": " + place.where() + ": ";
    if (p.host < 0 || p.host >= place.num_hosts || p.host == place.host)
      throw std::invalid_argument(at + "a piece for host " + std::to_string(p.host) +
                                  "; pieces go to the other hosts 0.." +
                                  std::to_string(place.num_hosts - 1) + " only");
    if (p.send_bytes < 0 || p.recv_bytes < 0)
      throw std::invalid_argument(at + "negative byte count for " + place.peer(p.host));
    if ((p.send_bytes > 0 && p.send == nullptr) || (p.recv_bytes > 0 && p.recv == nullptr))
      throw std::invalid_argument(at + "null buffer for " + place.peer(p.host));
  }
}

InterHostStage::Counts InterHostStage::counts_to_host(const char* op, const int64_t* send_counts,
                                                      int64_t* recv_counts, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  DEO_CUDA(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone)
    throw std::runtime_error(std::string("deep_ep.") + op + ": " + place.where() +
                             ": the exact inter-host wire reads the row counts on the host, "
                             "which a CUDA graph cannot capture; use the static wire");
  exchange_counts(op, send_counts, recv_counts, stream);
  const size_t n = static_cast<size_t>(place.num_hosts);
  Counts counts{std::vector<int64_t>(n, 0), std::vector<int64_t>(n, 0)};
  DEO_CUDA(cudaMemcpyAsync(counts.sent.data(), send_counts, sizeof(int64_t) * n,
                           cudaMemcpyDeviceToHost, stream));
  DEO_CUDA(cudaMemcpyAsync(counts.received.data(), recv_counts, sizeof(int64_t) * n,
                           cudaMemcpyDeviceToHost, stream));
  DEO_CUDA(cudaStreamSynchronize(stream));
  {
    // a stall aborted the rail while this thread waited: the counts never came
    std::lock_guard<std::mutex> lock(calls_);
    check_alive(op);
  }
  // the own host's entries are neither sent nor written by the exchange
  counts.sent[place.host] = counts.received[place.host] = 0;
  return counts;
}

}  // namespace deep_ep_ops
