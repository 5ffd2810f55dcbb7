#include "peer_memory.hpp"

#include <stdexcept>
#include <string>

namespace deep_ep_ops {

PeerMemoryTransport::PeerMemoryTransport(int rank, int num_ranks, int device)
    : rank_(rank), num_ranks_(num_ranks), device_(device) {
  if (num_ranks < 1 || num_ranks > kMaxRanks)
    throw std::invalid_argument("deep_ep_ops: the CUDA backend supports 1.." +
                                std::to_string(kMaxRanks) + " ranks per group, got " +
                                std::to_string(num_ranks));
  if (rank < 0 || rank >= num_ranks)
    throw std::invalid_argument("deep_ep_ops: rank " + std::to_string(rank) +
                                " is outside a group of " + std::to_string(num_ranks));
}

}  // namespace deep_ep_ops
