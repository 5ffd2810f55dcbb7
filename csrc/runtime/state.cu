// Host-side setup and teardown of a Buffer's CUDA state. Compiled by nvcc only because the NCCL
// device headers (ncclDevComm) need it; there is no device code here.
#include "state.hpp"

#include "host_checks.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace deep_ep_ops {

State::State(const StateConfig& c) : cfg(c) {
  if (cfg.num_ranks < 1 || cfg.num_ranks > kMaxRanks)
    throw std::runtime_error("deep_ep_ops: the CUDA backend supports 1.." +
                             std::to_string(kMaxRanks) + " ranks per group, got " +
                             std::to_string(cfg.num_ranks));
  if (cfg.topk > kMaxTopk)
    throw std::runtime_error("deep_ep_ops: num_topk must be <= " + std::to_string(kMaxTopk));
  int version = 0;
  DEO_NCCL(ncclGetVersion(&version));
  if (version != NCCL_VERSION_CODE) {
    // The device API has no ABI stability before 2.29/2.31: headers and library must match.
    throw std::runtime_error("deep_ep_ops: built against NCCL " +
                             std::to_string(NCCL_VERSION_CODE) + " but the loaded libnccl is " +
                             std::to_string(version) + "; rebuild (clear DEEP_EP_OPS_CACHE)");
  }
  DeviceGuard guard(cfg.device);
  auto comm_handle = reinterpret_cast<ncclComm_t>(cfg.comm_ptr);
  const int R = cfg.num_ranks, M = cfg.max_tokens, H = cfg.hidden, K = cfg.topk,
            E = cfg.num_experts;

  DEO_CUDA(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, cfg.device));
  int optin = 0, clock_khz = 0;
  DEO_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cfg.device));
  DEO_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, cfg.device));
  smem_optin = static_cast<size_t>(optin);
  handle_width = handle::handle_width(K);

  // ---- window layout ----
  const int64_t P = cfg.fp8 ? (H + 31) / 32 : 0;
  const int64_t meta_ints = align_up(4 + 3 * K, 4);
  const int64_t dispatch_bytes = static_cast<int64_t>(R) * M *
                                     (align_up(2LL * H, 16) + align_up(4 * P, 16) + 4 * meta_ints) +
                                 3 * 256;
  const int64_t combine_bytes =
      static_cast<int64_t>(M) * std::min(R, K) * align_up(4LL * H, 16);
  const int64_t cached_bytes =
      static_cast<int64_t>(M) * (align_up(4LL * H, 16) + align_up(4 * ((H + 31) / 32), 16)) + 256;
  // The metadata/scale slack on top of the combine area lets an fp32 dispatch fit whenever
  // the combine area already holds R*M fp32 rows (K >= R).
  const int64_t slack = static_cast<int64_t>(R) * M * (4 * meta_ints + align_up(4 * P, 16)) + 1024;
  data_bytes = align_up(std::max({dispatch_bytes, combine_bytes + slack, cached_bytes}), 4096);
  comm.flags_off = 0;
  comm.counts_off = align_up(static_cast<int64_t>(kNumSlots) * kMaxRanks * 4, 4096);
  comm.data_off = comm.counts_off + align_up(static_cast<int64_t>(R) * (E + R) * 4, 4096);
  window_bytes = align_up(comm.data_off + data_bytes, 1 << 21);

  DEO_CUDA(cudaMalloc(&peer_bases_dev_, sizeof(char*) * R));
  register_symmetric_window(cfg.comm_ptr, R, window_bytes, peer_bases_dev_, &base_, &window_,
                            comm.peer_base);

  auto* dc = new ncclDevComm;
  dev_comm_ = dc;
  ncclDevCommRequirements reqs;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 29, 0)
  reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
#else
  std::memset(&reqs, 0, sizeof(reqs));  // 2.28 has no initializer macro
#endif
  reqs.lsaBarrierCount = 1;  // LSA only: no GIN resources, so no NIC is needed
  DEO_NCCL(ncclDevCommCreate(comm_handle, &reqs, dc));
  if (dc->lsaSize != R || dc->lsaRank != cfg.rank) {
    throw std::runtime_error(
        "deep_ep_ops: every rank of the group must be a load/store (NVLink/P2P) peer on one "
        "host; NCCL reports an LSA team of " + std::to_string(dc->lsaSize) + " ranks for a group of " +
        std::to_string(R));
  }

  // ---- scratch ----
  const int64_t e_loc = E / R;
  const int64_t sizes[] = {
      static_cast<int64_t>(kNumSlots),      // epochs
      M,                                    // tok_dmask
      static_cast<int64_t>(M) * K,          // tok_rank
      static_cast<int64_t>(layout_max_ctas(M)) * (E + R),  // cta_prefix
      E,                                    // ebase
      R,                                    // cbase
      1,                                    // done
      handle_width,                         // send_handle (header row)
      recv_info_ints(static_cast<int>(e_loc)),  // recv_info
      2 * static_cast<int64_t>(kMaxLocalTiles),  // tile_status (uint64)
      E,                                    // tpe_acc
      3,                                    // tile_ctr
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
  scratch.cbase = reinterpret_cast<int*>(at(5));
  scratch.done = reinterpret_cast<unsigned*>(at(6));
  scratch.send_handle = reinterpret_cast<int*>(at(7));
  scratch.recv_info = reinterpret_cast<int*>(at(8));
  scratch.tile_status = reinterpret_cast<unsigned long long*>(at(9));
  scratch.tpe_acc = reinterpret_cast<int*>(at(10));
  scratch.tile_ctr = reinterpret_cast<unsigned*>(at(11));

  error_host = alloc_error_record(&comm.error);
  DEO_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&pinned_counts), 64, cudaHostAllocDefault));

  comm.rank = cfg.rank;
  comm.num_ranks = R;
  comm.timeout_cycles = static_cast<long long>(cfg.timeout_s * clock_khz * 1000.0);
  comm.trap_on_timeout = trap_on_timeout_requested();
  DEO_CUDA(cudaDeviceSynchronize());
}

void State::destroy() {
  if (window_ == nullptr) return;
  DeviceGuard guard(cfg.device);
  auto comm_handle = reinterpret_cast<ncclComm_t>(cfg.comm_ptr);
  cudaDeviceSynchronize();  // no kernel may still use the window
  auto* dc = static_cast<ncclDevComm*>(dev_comm_);
  ncclDevCommDestroy(comm_handle, dc);
  delete dc;
  dev_comm_ = nullptr;
  ncclCommWindowDeregister(comm_handle, static_cast<ncclWindow_t>(window_));
  window_ = nullptr;
  ncclMemFree(base_);
  base_ = nullptr;
  cudaFree(scratch_block_);
  scratch_block_ = nullptr;
  cudaFree(peer_bases_dev_);
  peer_bases_dev_ = nullptr;
  cudaFreeHost(error_host);
  error_host = nullptr;
  comm.error = nullptr;
  cudaFreeHost(pinned_counts);
  pinned_counts = nullptr;
}

State::~State() {
  // Teardown is collective; a State dropped without destroy() (interpreter exit) leaks its
  // window rather than calling NCCL from one rank alone.
}

}  // namespace deep_ep_ops
