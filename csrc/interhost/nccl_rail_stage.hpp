// The inter-host stage over NCCL's host API: one communicator per Buffer over its rail (the
// ranks with this rank's local index, one per host; rail rank = host), grouped
// ncclSend/ncclRecv to every other host's rail peer on the caller's stream.
#pragma once

#include <memory>
#include <string>

#include "rail_stage.hpp"

namespace deep_ep_ops {

// A fresh ncclUniqueId as bytes (rail rank 0 makes it; the Python side hands it to the others
// over the Buffer's process group).
std::string nccl_rail_unique_id();

// Collective over the rail: every rail rank calls it with the same id (ncclCommInitRank).
std::shared_ptr<InterHostStage> make_nccl_rail_stage(const std::string& unique_id,
                                                     const RailPlace& place, int device);

}  // namespace deep_ep_ops
