// The inter-host stage of multi-host EP, CUDA side: byte ranges between this rank and its rail
// peers (the ranks with the same local index on the other hosts). The CPU reference's stage
// (deep_ep_ops/cpu/interhost.py) fixes what crosses; this interface only moves bytes, so the
// kernels that pack rows into per-host slots and unpack what arrives stay the same when NCCL's
// device-initiated GIN replaces the NCCL host-API implementation (nccl_rail_stage.cpp).
//
// Everything is enqueued on the caller's stream with no host sync, except counts_to_host (the
// exact wire's count read), so a static-wire exchange can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace deep_ep_ops {

// Where this rank sits: group rank = host * ranks_per_host + local.
struct RailPlace {
  int rank = 0;
  int host = 0;
  int local = 0;
  int num_hosts = 1;
  int ranks_per_host = 1;

  int peer_rank(int peer_host) const { return peer_host * ranks_per_host + local; }
  // "rank r (host h, local index l)": every error names where it happened.
  std::string where() const;
  // "host h' (rail peer rank r')"
  std::string peer(int peer_host) const;
};

// Checks the numbers and that rank == host * ranks_per_host + local (throws otherwise).
RailPlace make_rail_place(int rank, int num_hosts, int ranks_per_host);

// One contiguous range each way between this rank and its rail peer on `host`: send_bytes from
// `send` go there, recv_bytes from there land at `recv` (device pointers). The peer must post the
// mirror piece (its send_bytes == our recv_bytes). Pieces for one host are matched in order,
// so a message of several parts (rows, top-k ids, weights, scales) is several pieces.
struct RailPiece {
  int host = -1;
  const void* send = nullptr;
  int64_t send_bytes = 0;
  void* recv = nullptr;
  int64_t recv_bytes = 0;
};

class InterHostStage {
 public:
  explicit InterHostStage(const RailPlace& place) : place(place) {}
  virtual ~InterHostStage() = default;
  InterHostStage(const InterHostStage&) = delete;
  InterHostStage& operator=(const InterHostStage&) = delete;

  // Dispatch direction (dispatch, cached_dispatch): rows to the hosts that own their experts.
  // `op` names the calling op in errors.
  virtual void exchange_rows(const char* op, const std::vector<RailPiece>& pieces,
                             cudaStream_t stream) = 0;
  // Combine direction: host partials back to the rail peers whose rows they sum.
  virtual void return_partials(const char* op, const std::vector<RailPiece>& pieces,
                               cudaStream_t stream) = 0;
  // The exact wire's first message: send_counts[h'] (device int64[num_hosts]) goes to host
  // h''s rail peer, its count for this host lands in recv_counts[h']. The own host's entries
  // are neither sent nor written.
  virtual void exchange_counts(const char* op, const int64_t* send_counts, int64_t* recv_counts,
                               cudaStream_t stream) = 0;
  // Collective over the rail: release the communication resources. No op may use it after.
  virtual void destroy() = 0;
  // Local, from any thread (the stall watch's): stop the transfers still pending on the rail
  // (their kernels exit, so a sync blocked on them returns, with what did not arrive missing)
  // and make every later call throw `reason`. Returns false, doing nothing, while another thread
  // is inside a call on this stage (try again later); true once the stage is aborted or gone.
  bool abort(const std::string& reason);
  bool alive() const { return alive_.load(); }
  virtual const char* name() const = 0;

  // exchange_counts, then both count vectors on the host (a stream sync: the exact wire's one
  // sync, refused while the stream is being captured). The sender needs its own counts on the
  // host too (to size its sends), so they come back in the same sync. Entries [place.host]
  // are 0.
  struct Counts {
    std::vector<int64_t> sent, received;
  };
  Counts counts_to_host(const char* op, const int64_t* send_counts, int64_t* recv_counts,
                        cudaStream_t stream);

  const RailPlace place;

 protected:
  // Hosts in range and not this one, sizes >= 0, pointers set where bytes > 0.
  void check_pieces(const char* op, const std::vector<RailPiece>& pieces) const;
  // Throws when the stage was destroyed or aborted (call it holding calls_).
  void check_alive(const char* op) const;
  // abort's transport part, under calls_ and only while alive: end what is pending, locally.
  virtual void abort_transport() = 0;

  // Held by every call into the transport, and tried by abort: the watch's thread never
  // aborts under a call that is enqueuing on another thread.
  std::mutex calls_;
  std::atomic<bool> alive_{true};
  std::string abort_reason_;  // set once aborted (under calls_)
};

}  // namespace deep_ep_ops
