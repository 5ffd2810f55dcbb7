// Host-side setup and teardown of a Buffer's CUDA state (window layout, scratch, error record).
#include "ep_state.hpp"

#include "../host/cuda_check.hpp"
#include "../host/error_record.hpp"

#include <algorithm>
#include <stdexcept>

namespace deep_ep_ops {

EpState::EpState(const EpConfig& c, std::shared_ptr<PeerMemoryTransport> transport)
    : cfg(c), transport_(std::move(transport)) {
  if (transport_->num_ranks() != cfg.num_ranks || transport_->rank() != cfg.rank)
    throw std::invalid_argument("deep_ep_ops: the transport's group differs from the Buffer's");
  if (cfg.topk > kMaxTopk)
    throw std::invalid_argument("deep_ep_ops: num_topk must be <= " + std::to_string(kMaxTopk));
  DeviceGuard guard(cfg.device);
  const int R = cfg.num_ranks, M = cfg.max_tokens, H = cfg.hidden, K = cfg.topk,
            E = cfg.num_experts;

  DEO_CUDA(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, cfg.device));
  int optin = 0;
  DEO_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cfg.device));
  smem_optin = static_cast<size_t>(optin);
  DEO_CUDA(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, cfg.device));
  handle_width = handle::handle_width(K);

  if (cfg.direct_slots < 0)
    throw std::invalid_argument("deep_ep_ops: direct_outputs must be >= 0");
  win = EpWindow::plan(R, M, H, K, E, handle_width, cfg.fp8, cfg.direct_slots,
                       cfg.zero_copy_combine);
  slots = std::make_shared<OutputSlots>(cfg.direct_slots);
  comm.flags_off = win.flags_off;
  comm.counts_off = win.counts_off;
  comm.outs_off = win.outs_off;
  comm.tokens_off = win.tokens_off;
  comm.blocks_off = win.blocks_off;
  comm.max_blocks = max_count_blocks(M);
  comm.data_off = win.data_off;

  window_ = transport_->allocate(win.window_bytes);
  std::copy(window_.peer_base, window_.peer_base + kMaxRanks, comm.peer_base);

  // ---- scratch ----
  const int64_t e_loc = E / R;
  const int64_t sizes[] = {
      static_cast<int64_t>(kNumSlots),      // epochs
      M,                                    // tok_dmask
      static_cast<int64_t>(M) * K,          // tok_rank
      static_cast<int64_t>(layout_max_ctas(M)) * (E + R),  // cta_prefix
      E,                                    // ebase
      1,                                    // done
      handle_width,                         // send_handle (header row)
      recv_info_ints(static_cast<int>(e_loc)),  // recv_info
      2 * static_cast<int64_t>(kMaxLocalTiles),  // tile_status (uint64)
      E,                                    // tpe_acc
      3,                                    // tile_ctr
      2 * static_cast<int64_t>(kMaxBarrierCtas) * kPushStamps,  // push_times (uint64)
      2 * static_cast<int64_t>(kKernelStamps),  // kernel_times (uint64)
      1,                                    // push_ticket
      1,                                    // bases_ready
      1,                                    // combine_ticket
      1,                                    // count_ticket
      1,                                    // push_exits
  };
  constexpr int kParts = sizeof(sizes) / sizeof(sizes[0]);
  int64_t total = 0, offs[kParts];
  for (int i = 0; i < kParts; ++i) {
    offs[i] = total;
    total += align_up(sizes[i] * 4, 256);
  }
  DEO_CUDA(cudaMalloc(&scratch_block_, static_cast<size_t>(total)));
  DEO_CUDA(cudaMemset(scratch_block_, 0, static_cast<size_t>(total)));
  auto at = [&](int i) { return static_cast<char*>(scratch_block_) + offs[i]; };
  comm.epochs = reinterpret_cast<unsigned*>(at(0));
  scratch.tok_dmask = reinterpret_cast<unsigned*>(at(1));
  scratch.tok_rank = reinterpret_cast<int*>(at(2));
  scratch.cta_prefix = reinterpret_cast<int*>(at(3));
  scratch.ebase = reinterpret_cast<int*>(at(4));
  scratch.done = reinterpret_cast<unsigned*>(at(5));
  scratch.send_handle = reinterpret_cast<int*>(at(6));
  scratch.recv_info = reinterpret_cast<int*>(at(7));
  scratch.tile_status = reinterpret_cast<unsigned long long*>(at(8));
  scratch.tpe_acc = reinterpret_cast<int*>(at(9));
  scratch.tile_ctr = reinterpret_cast<unsigned*>(at(10));
  scratch.push_times = reinterpret_cast<unsigned long long*>(at(11));
  scratch.kernel_times = reinterpret_cast<unsigned long long*>(at(12));
  scratch.push_ticket = reinterpret_cast<unsigned*>(at(13));
  scratch.bases_ready = reinterpret_cast<unsigned*>(at(14));
  scratch.combine_ticket = reinterpret_cast<unsigned*>(at(15));
  scratch.count_ticket = reinterpret_cast<unsigned*>(at(16));
  scratch.push_exits = reinterpret_cast<unsigned*>(at(17));

  comm.rank = cfg.rank;
  comm.num_ranks = R;
  comm.wait = make_wait_context(cfg.rank, cfg.timeout_s, &error_host);
  DEO_CUDA(cudaDeviceSynchronize());
}

void EpState::destroy() {
  if (!alive()) return;
  DeviceGuard guard(cfg.device);
  cudaDeviceSynchronize();  // no kernel may still use the window
  transport_->release(window_);
  std::fill(comm.peer_base, comm.peer_base + kMaxRanks, nullptr);
  cudaFree(scratch_block_);
  scratch_block_ = nullptr;
  release_wait_context(comm.wait, error_host);
}

EpState::~EpState() {
  // Teardown is collective; a State dropped without destroy() (interpreter exit) leaks its
  // window rather than releasing it from one rank alone.
}

}  // namespace deep_ep_ops
