// Setup and teardown of ChannelState.
#include "channel_state.hpp"

#include "../host/cuda_check.hpp"
#include "../host/error_record.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {

ChannelState::ChannelState(const ChannelConfig& c, std::shared_ptr<PeerMemoryTransport> transport)
    : cfg(c), transport_(std::move(transport)) {
  if (transport_->num_ranks() != cfg.num_ranks || transport_->rank() != cfg.rank)
    throw std::invalid_argument("deep_ep_ops: the transport's group differs from the Buffer's");
  if (cfg.pp_slots < 1) throw std::invalid_argument("Buffer: pp_slots must be >= 1");
  if (cfg.pp_max_bytes < 0 || cfg.cp_max_bytes < 0 || cfg.pp_inline_bytes < 0 ||
      cfg.cp_inline_bytes < 0)
    throw std::invalid_argument("Buffer: pp/cp byte sizes must be >= 0");
  DeviceGuard guard(cfg.device);
  const int R = cfg.num_ranks;
  DEO_CUDA(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, cfg.device));

  // ---- window layout (16-byte aligned payloads; 4 KiB-aligned regions) ----
  lay.pp_slots = cfg.pp_slots;
  lay.pp_inline_bytes = cfg.pp_inline_bytes;
  lay.pp_slot_stride = align_up(16 + cfg.pp_inline_bytes, 16);
  lay.pp_max_bytes = cfg.pp_max_bytes;
  lay.cp_inline_bytes = align_up(cfg.cp_inline_bytes, 16);
  lay.cp_max_bytes = cfg.cp_max_bytes;
  int64_t off = kChannelFlagBytes;
  lay.pp_ring_off = off;
  off = align_up(off + static_cast<int64_t>(R) * cfg.pp_slots * lay.pp_slot_stride, 4096);
  lay.pp_bulk_off = off;
  off = align_up(off + static_cast<int64_t>(R) * cfg.pp_max_bytes, 4096);
  lay.cp_inline_off = off;
  off = align_up(off + 2LL * R * lay.cp_inline_bytes, 4096);
  lay.cp_bulk_off = off;
  off = align_up(off + cfg.cp_max_bytes, 4096);
  lay.window_bytes = align_up(off, 1 << 21);

  window_ = transport_->allocate(lay.window_bytes);
  std::copy(window_.peer_base, window_.peer_base + kMaxRanks, comm.peer_base);

  ChannelCounters* ctr = nullptr;
  DEO_CUDA(cudaMalloc(&ctr, sizeof(ChannelCounters)));
  DEO_CUDA(cudaMemset(ctr, 0, sizeof(ChannelCounters)));
  comm.ctr = ctr;
  comm.rank = cfg.rank;
  comm.num_ranks = R;
  comm.wait = make_wait_context(cfg.rank, cfg.timeout_s, &error_host);
  for (auto& e : events_) DEO_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  DEO_CUDA(cudaDeviceSynchronize());
}

EngramTable& ChannelState::add_engram_table(int64_t n, int64_t row_bytes, int64_t max_rows) {
  if (!alive()) throw std::runtime_error("deep_ep_ops: the Buffer's CUDA state was destroyed");
  DeviceGuard guard(cfg.device);
  EngramTable t;
  t.view.n = n;
  t.view.row_bytes = row_bytes;
  t.view.max_rows = max_rows;
  t.view.count_off = align_up(n * row_bytes, 4096);
  t.view.idx_off = t.view.count_off + 256;
  t.view.rows_off = align_up(t.view.idx_off + 8 * max_rows, 256);
  t.window = transport_->allocate(align_up(t.view.rows_off + max_rows * row_bytes, 1 << 21));
  std::copy(t.window.peer_base, t.window.peer_base + kMaxRanks, t.view.peer_base);
  tables_.push_back(t);
  return tables_.back();
}

void ChannelState::destroy() {
  if (!alive()) return;
  DeviceGuard guard(cfg.device);
  cudaDeviceSynchronize();  // no kernel or copy may still use a window
  for (auto it = tables_.rbegin(); it != tables_.rend(); ++it) transport_->release(it->window);
  tables_.clear();
  transport_->release(window_);
  std::fill(comm.peer_base, comm.peer_base + kMaxRanks, nullptr);
  cudaFree(comm.ctr);
  comm.ctr = nullptr;
  for (auto& e : events_) {
    if (e != nullptr) cudaEventDestroy(e);
    e = nullptr;
  }
  release_wait_context(comm.wait, error_host);
}

ChannelState::~ChannelState() {
  // Teardown is collective; a state dropped without destroy() leaks its windows rather than
  // releasing them from one rank alone.
}

}  // namespace deep_ep_ops
