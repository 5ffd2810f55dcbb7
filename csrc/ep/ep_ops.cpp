// Host side of dispatch / cached_dispatch / combine: check what Python cannot cheaply check
// (window capacity), allocate fresh outputs with torch's allocator on the current stream (or,
// for a dispatch's recv_x / recv_scales, in a direct-output slot of the window: see
// output_slots.hpp), and launch the kernels. No host sync.
#include "ep_ops.hpp"

#include "../host/cuda_check.hpp"
#include "../host/error_record.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

namespace deep_ep_ops {

int bulk_row_limit(const EpState& st) {
  if (st.cc_major < 9) return 0;
  const int64_t room = static_cast<int64_t>(st.smem_optin) - kBulkStaticReserve;
  return static_cast<int>(std::max<int64_t>(0, room / kBulkWarps / 16 * 16));
}

namespace {

constexpr int kDefaultCtas = 64;  // push/pull kernels: enough CTAs to keep NVLink busy

void check_alive(const EpState& st, const char* op) {
  if (!st.alive())
    throw std::runtime_error(std::string("deep_ep.") + op +
                             ": the Buffer's CUDA state was destroyed");
  // A GPU wait of an earlier call failed: the ranks' barrier epochs are out of step and
  // results since then are garbage. Say so (and who stalled) instead of continuing.
  raise_if_broken(st.error_host, op);
}

void check_fits(const EpState& st, const char* op, int64_t end) {
  if (!st.win.fits(end))
    throw std::runtime_error(std::string("deep_ep.") + op + ": needs " +
                             std::to_string(end - st.win.data_off) + " bytes of the window's "
                             "data region but the Buffer reserved " +
                             std::to_string(st.win.data_bytes) +
                             " (the rows are wider than the Buffer's hidden allows)");
}

constexpr int kWarpsPerCta = 16;  // the push/pull/epilogue kernels run 512 threads

// A fresh uninitialised CUDA tensor on `device` without a trip through the dispatcher (the
// kernels write every element of every output).
at::Tensor empty(at::IntArrayRef size, at::ScalarType dtype, at::Device device) {
  return at::Tensor(at::detail::empty_cuda(size, dtype, device, std::nullopt));
}

// Grid of a kernel with one warp per item when there is one rank (no barrier, so any grid):
// at most one CTA per SM (these kernels hold 512 threads of up to 128 registers) or num_sms.
int local_ctas(const EpState& st, int64_t num_sms, int64_t items) {
  const int64_t need = (items + kWarpsPerCta - 1) / kWarpsPerCta;
  const int64_t cap = num_sms > 0 ? num_sms : st.sm_count;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, need)));
}

// Grid of a local (barrier-free) kernel with one warp per item: no more CTAs than items need.
int epilogue_ctas(const EpState& st, int64_t items) {
  const int64_t need = (items + kWarpsPerCta - 1) / kWarpsPerCta;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(st.sm_count * 2, need)));
}

// Grid of a barrier kernel with one warp per item, at most max_items items on every rank: the
// cap is a function of the Buffer config, so it is the same on every rank (a CTA's barrier
// slot is its index). Small decode batches launch fewer idle CTAs.
int barrier_ctas_for(const EpState& st, int64_t num_sms, int64_t max_items) {
  const int64_t need = (max_items + kWarpsPerCta - 1) / kWarpsPerCta;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(barrier_ctas(st, num_sms), need)));
}

// The scale rows of a dispatch's outputs: as x_scales' (P columns), or [C, 0] float32 without.
struct ScaleRows {
  int64_t cols;
  at::ScalarType dtype;
};
ScaleRows scale_rows(const std::optional<at::Tensor>& x_scales) {
  if (!x_scales.has_value()) return {0, at::kFloat};
  return {x_scales->size(1), x_scales->scalar_type()};
}

// Outputs of a dispatch made already in a direct-output slot (slot_tensors): recv_x and
// recv_scales, and for compact outputs the routing tensors and the handle too (else undefined).
struct SlotOutputs {
  at::Tensor x, s, idx, w, handle;
};

// The outputs of a dispatch with C receive rows: recv_x [C, H], scales [C, P], topk idx and
// weights ([C, K] compact, [C] expert-major), tokens_per_expert [E_loc], handle [1 + T + C, W];
// those of `made` that are defined, the others fresh.
DispatchOut dispatch_outputs(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                             int64_t C, int K, int E_loc, int W, bool expand,
                             const SlotOutputs& made = {}) {
  const at::Device dev = x.device();
  const ScaleRows sr = scale_rows(x_scales);
  const auto or_fresh = [&](const at::Tensor& t, at::IntArrayRef size, at::ScalarType dtype) {
    return t.defined() ? t : empty(size, dtype, dev);
  };
  return {or_fresh(made.x, {C, x.size(1)}, x.scalar_type()),
          or_fresh(made.s, {C, sr.cols}, sr.dtype),
          expand ? empty({C}, at::kInt, dev) : or_fresh(made.idx, {C, K}, at::kLong),
          expand ? empty({C}, at::kFloat, dev) : or_fresh(made.w, {C, K}, at::kFloat),
          empty({E_loc}, at::kInt, dev),
          or_fresh(made.handle, {1 + x.size(0) + C, W}, at::kInt)};
}

// Where a dispatch's outputs would sit in a direct-output slot: compact ones with their
// routing tensors and handle (the peers write those too, and no epilogue runs).
EpWindow::SlotLayout output_slot_layout(const EpState& st, int64_t C, int64_t x_bytes,
                                        int64_t s_bytes, bool expand) {
  return EpWindow::slot_layout(C, x_bytes, s_bytes, !expand, st.cfg.topk, st.handle_width,
                               st.cfg.max_tokens);
}

// A direct-output slot for this dispatch's outputs (laid out as `l`), or -1: the Buffer has
// none, the outputs do not fit one, every slot holds live outputs, or the stream is being
// captured (a graph's outputs are memory the graph owns, replayed long after this call).
int take_output_slot(EpState& st, const EpWindow::SlotLayout& l, cudaStream_t stream) {
  if (st.slots->size() == 0 || !st.win.slot_fits(l) || stream_capturing(stream)) return -1;
  return st.slots->acquire(l.routing_at >= 0 ? 5 : 2);  // each output made in it holds it
}

// The outputs that live in slot `slot` of this rank's window (laid out as `l`): recv_x [C, H]
// and recv_scales [C, P], and with routing recv_topk_idx / recv_topk_weights [C, K] and the
// handle [1 + T + C, W]; the slot is free again once all of them are gone.
SlotOutputs slot_tensors(EpState& st, int slot, const EpWindow::SlotLayout& l, const at::Tensor& x,
                         const std::optional<at::Tensor>& x_scales, int64_t C) {
  char* window = st.comm.peer_base[st.cfg.rank];
  const int64_t slot_at = st.win.slot_off(slot);
  std::shared_ptr<OutputSlots> pool = st.slots;
  auto release = [pool, slot](void*) { pool->release(slot); };
  // the device given as the target too: from_blob then skips asking the driver where the
  // pointer lives (a host round trip per tensor)
  const at::Device dev = x.device();
  const at::TensorOptions on = at::TensorOptions().device(dev);
  const auto tensor = [&](int64_t at, at::IntArrayRef size, at::ScalarType dtype) {
    return at::from_blob(window + at, size, release, on.dtype(dtype), dev);
  };
  const ScaleRows sr = scale_rows(x_scales);
  SlotOutputs o;
  o.x = tensor(slot_at, {C, x.size(1)}, x.scalar_type());
  o.s = tensor(slot_at + l.scales_at, {C, sr.cols}, sr.dtype);
  if (l.routing_at >= 0) {
    const int K = st.cfg.topk, W = st.handle_width;
    const SlotRouting r = SlotRouting::at(slot_at + l.routing_at, C, K, W);
    o.idx = tensor(r.idx, {C, K}, at::kLong);
    o.w = tensor(r.w, {C, K}, at::kFloat);
    o.handle = tensor(r.handle_start(static_cast<int>(x.size(0)), W), {1 + x.size(0) + C, W},
                      at::kInt);
  }
  return o;
}

bool off16(int64_t v) { return (v & 15) != 0; }
bool off16(const void* q) { return off16(static_cast<int64_t>(reinterpret_cast<uintptr_t>(q))); }

// A push kernel's bulk_row_bytes: DEEP_EP_OPS_BULK_COPY=1 (read once per process) asks for rows
// moved by bulk copies, which take rows of `row` bytes, a 16-byte multiple, up to
// bulk_row_limit(); `aligned`: the caller's addresses allow it. 0: the register copies.
int bulk_rows(const EpState& st, int64_t row, bool aligned) {
  static const bool requested = [] {
    const char* v = std::getenv("DEEP_EP_OPS_BULK_COPY");
    return v != nullptr && v[0] == '1' && v[1] == '\0';
  }();
  if (!requested || !aligned || off16(row) || row > bulk_row_limit(st)) return 0;
  return static_cast<int>(row);
}

// Compact rows from two ranks up whose x, scales, this rank's outputs and staging rows sit at
// 16-byte multiples (a peer's direct-output rows are checked on the GPU): the rows the bulk
// fan-out and the pipelined push loop take.
bool dispatch_rows_aligned(const DispatchIO& io, const DispatchRows& rows, int R, bool expand) {
  if (R < 2 || expand) return false;
  return !(off16(io.x_bytes) || off16(io.s_bytes) || off16(io.x) || off16(io.recv_x) ||
           (io.s_bytes > 0 && (off16(io.scales) || off16(io.recv_s))) || off16(rows.x_off) ||
           off16(rows.s_off) || off16(rows.x_stride) || off16(rows.s_stride));
}

// An integer experiment knob from the environment (read by the caller once per process), or
// `fallback` when unset or not a number in [lo, hi].
int env_knob(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return (*end == '\0' && n >= lo && n <= hi) ? static_cast<int>(n) : fallback;
}

// Grid of a barrier kernel with peers (barrier_ctas_for): num_sms CTAs when given, else
// `percent` of the SMs this process sees, at most kDefaultCtas. The same on every rank (a CTA's
// barrier slot is its index): the SM share is.
int share_ctas(const EpState& st, int64_t num_sms, int percent, int64_t max_items) {
  const int64_t share = std::max<int64_t>(1, std::min<int64_t>(kDefaultCtas, st.sm_count * percent / 100));
  return barrier_ctas_for(st, num_sms > 0 ? num_sms : share, max_items);
}

// CombineParams::reduce_via_smem: on unless DEEP_EP_OPS_COMBINE_SMEM=0 (read once per process)
// or the device grants a block less shared memory than the staged reduce needs.
bool combine_reduce_via_smem(const EpState& st) {
  static const bool off = [] {
    const char* v = std::getenv("DEEP_EP_OPS_COMBINE_SMEM");
    return v != nullptr && v[0] == '0' && v[1] == '\0';
  }();
  return !off && st.smem_optin >= kCombineReduceSmemBytes;
}

// Where combine's x sits in this rank's window when the peers may read its rows in place: x is
// the start of a combine-input slot (buf.combine_input()), there are no weights (a partial is
// then the sum of the group's rows, which the reader forms itself) and more than one rank; else
// -1 (partials are pushed).
int64_t in_place_offset(const EpState& st, const at::Tensor& x, bool weighted) {
  if (st.win.num_cin_slots == 0 || weighted || st.cfg.num_ranks == 1 || !x.is_contiguous()) return -1;
  const char* base = st.comm.peer_base[st.cfg.rank];
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  for (int i = 0; i < st.win.num_cin_slots; ++i)
    if (static_cast<const char*>(x.data_ptr()) == base + st.win.cin_slot_off(i) &&
        bytes <= st.win.cin_slot_bytes)
      return st.win.cin_slot_off(i);
  return -1;
}

// A combine of the combine-input slot handed out last: combine_input() may hand out the
// next one (this combine's first barrier keeps that slot's next writer behind the peers'
// reads of its previous contents).
void note_combine_input_used(EpState& st, const at::Tensor& x) {
  const int i = st.cin_pending.load();
  if (i >= 0 && static_cast<const char*>(x.data_ptr()) ==
                    st.comm.peer_base[st.cfg.rank] + st.win.cin_slot_off(i))
    st.cin_pending.store(-1);
}

// What the kernels that write a dispatch's outputs see of its inputs and outputs.
DispatchIO dispatch_io(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                       const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                       const DispatchOut& out, int K, int E, int W) {
  const auto& [recv_x, recv_s, recv_idx, recv_w, tpe, handle] = out;
  DispatchIO io{};
  io.x = static_cast<const char*>(x.data_ptr());
  io.scales = x_scales.has_value() ? static_cast<const char*>(x_scales->data_ptr()) : nullptr;
  io.topk_idx = topk_idx.data_ptr();
  io.topk_weights = topk_weights.data_ptr<float>();
  io.recv_x = static_cast<char*>(recv_x.data_ptr());
  io.recv_s = static_cast<char*>(recv_s.data_ptr());
  io.recv_idx = recv_idx.data_ptr();
  io.recv_w = recv_w.data_ptr<float>();
  io.tpe = tpe.data_ptr<int>();
  io.handle = handle.data_ptr<int>();
  io.idx64 = topk_idx.scalar_type() == at::kLong;
  io.x_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  io.s_bytes = scale_rows(x_scales).cols * 4;
  io.T = static_cast<int>(x.size(0));
  io.K = K;
  io.E = E;
  io.W = W;
  io.C = static_cast<int>(recv_x.size(0));
  return io;
}

}  // namespace

int barrier_ctas(const EpState& st, int64_t num_sms) {
  int64_t n = num_sms > 0 ? num_sms : std::min(kDefaultCtas, st.sm_count);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, kMaxBarrierCtas)));
}

DispatchOut dispatch(EpState& st, const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                     const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                     int64_t num_experts, int64_t alignment, bool expand, int64_t num_sms) {
  check_alive(st, "dispatch");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int R = st.cfg.num_ranks, M = st.cfg.max_tokens, K = st.cfg.topk;
  const int E = static_cast<int>(num_experts), E_loc = E / R, A = static_cast<int>(alignment);
  const int W = st.handle_width;
  const int64_t T = x.size(0), H = x.size(1);
  if (E != st.cfg.num_experts)
    throw std::invalid_argument("deep_ep.dispatch: num_experts differs from the Buffer's");
  if (topk_weights.scalar_type() != at::kFloat)
    throw std::invalid_argument("deep_ep.dispatch: the CUDA backend takes float32 topk_weights");
  const bool idx64 = topk_idx.scalar_type() == at::kLong;
  const int64_t x_bytes = H * static_cast<int64_t>(x.element_size());
  const int64_t s_bytes = scale_rows(x_scales).cols * 4;

  const int64_t cap = static_cast<int64_t>(R) * M;
  const DispatchRows rows = st.win.dispatch_rows(R, M, K, x_bytes, s_bytes);
  check_fits(st, "dispatch", EpWindow::dispatch_end(rows, R, M));

  if (R == 1 && !expand) {
    // one rank, compact rows, static capacity: a local permute in one kernel
    const int64_t C = cap;
    DispatchOut out = dispatch_outputs(x, x_scales, C, K, E_loc, W, false);
    LocalDispatchParams lp{};
    lp.io = dispatch_io(x, x_scales, topk_idx, topk_weights, out, K, E, W);
    lp.A = A;
    lp.M = M;
    lp.buffer_id = st.cfg.buffer_id;
    lp.s = st.scratch;
    lp.comm = st.comm;
    check_cuda(launch_local_dispatch(lp, local_ctas(st, num_sms, std::max<int64_t>(T, C)), stream),
                 "launching dispatch (one rank) kernel");
    return out;
  }

  const int64_t C = expand ? align_up(cap * std::min(K, E_loc) + static_cast<int64_t>(A - 1) * E_loc, A)
                           : cap;

  // phase 1: counts, count exchange, per-destination bases, handle header (into scratch)
  LayoutParams lp{};
  lp.topk_idx = topk_idx.data_ptr();
  lp.idx64 = idx64;
  lp.T = static_cast<int>(T);
  lp.K = K;
  lp.E = E;
  lp.E_loc = E_loc;
  lp.A = A;
  lp.M = M;
  lp.expand = expand;
  lp.W = W;
  lp.C = static_cast<int>(C);
  lp.buffer_id = st.cfg.buffer_id;
  // DEEP_EP_OPS_LAYOUT_WARPS (experiment): fewer warps per count CTA, so more CTAs count
  static const int layout_warps_asked = env_knob("DEEP_EP_OPS_LAYOUT_WARPS", 0, 1, 32);
  lp.warps = layout_warps(E, R, std::min<size_t>(st.smem_optin, 200 * 1024));
  if (layout_warps_asked > 0) lp.warps = std::min(lp.warps, layout_warps_asked);
  lp.cta_tokens = lp.warps * 32;
  lp.s = st.scratch;
  lp.comm = st.comm;

  // outputs first: the count's entry (the layout kernel, or the fused push) tells the peers
  // where recv_x / recv_scales (and compact routing outputs) live when they sit in a
  // direct-output slot (with one rank nothing crosses a window)
  const EpWindow::SlotLayout in_slot = output_slot_layout(st, C, x_bytes, s_bytes, expand);
  const int slot = R > 1 ? take_output_slot(st, in_slot, stream) : -1;
  DispatchOut out = dispatch_outputs(x, x_scales, C, K, E_loc, W, expand,
                                     slot >= 0 ? slot_tensors(st, slot, in_slot, x, x_scales, C)
                                               : SlotOutputs{});
  lp.out_x_off = lp.out_s_off = lp.out_r_off = -1;
  if (slot >= 0) {
    lp.out_x_off = st.win.slot_off(slot);
    lp.out_s_off = lp.out_x_off + in_slot.scales_at;
    if (in_slot.routing_at >= 0) lp.out_r_off = lp.out_x_off + in_slot.routing_at;
    ++st.slots->direct;
  } else if (R > 1) {
    ++st.slots->staged;
  }

  // phase 2: final rows, handle header + send part; rows into the other destinations' windows
  // and this rank's own rows straight into the outputs
  PushParams pp{};
  pp.io = dispatch_io(x, x_scales, topk_idx, topk_weights, out, K, E, W);
  pp.E_loc = E_loc;
  pp.expand = expand;
  pp.local_only = R == 1;
  pp.rows = rows;
  pp.s = st.scratch;
  pp.comm = st.comm;
  const bool aligned = dispatch_rows_aligned(pp.io, rows, R, expand);
  pp.bulk_row_bytes = bulk_rows(st, pp.io.x_bytes + pp.io.s_bytes, aligned);
  static const int prefetch = env_knob("DEEP_EP_OPS_PUSH_PREFETCH", 0, 0, 1);  // (experiment)
  static const int pipeline = env_knob("DEEP_EP_OPS_PUSH_PIPELINE", 1, 0, 1);  // (A/B)
  static const int fuse = env_knob("DEEP_EP_OPS_DISPATCH_FUSED", 0, 0, 1);     // (experiment)
  pp.prefetch = prefetch;
  pp.pipelined = aligned && pp.bulk_row_bytes == 0 && pipeline && pipelined_push_fits(st.smem_optin);
  // The fused push counts with its own CTAs (no layout kernel): count blocks of its warps (at
  // most DEEP_EP_OPS_LAYOUT_WARPS of them when set)
  const int fused_warps = pp.pipelined && fuse ? fused_count_warps(E, R) : 0;
  pp.fused = fused_warps > 0;
  if (pp.fused) {
    lp.warps = layout_warps_asked > 0 ? std::min(fused_warps, layout_warps_asked) : fused_warps;
    lp.cta_tokens = lp.warps * 32;
    pp.lay = lp;
  }
  pp.cta_tokens = lp.cta_tokens;
  const int table_ints = count_blocks(static_cast<int>(T), lp.cta_tokens) * R;
  pp.base_table = pp.pipelined && base_table_fits(st.smem_optin, table_ints) ? table_ints : 0;
  // (a block word carries its rank's block count in 16 bits)
  static const int block_words = env_knob("DEEP_EP_OPS_BLOCK_WORDS", 1, 0, 1);  // (A/B)
  pp.block_words = block_words && pp.base_table > 0 && !pp.fused && max_count_blocks(M) < (1 << 16);
  if (R > 1) ++(pp.bulk_row_bytes > 0 ? st.dispatch_bulk : st.dispatch_register);
  if (pp.pipelined) ++st.dispatch_pipelined;
  if (pp.fused) ++st.dispatch_fused;
  static const int skip = env_knob("DEEP_EP_OPS_PUSH_SKIP", 0, 0, 127);  // (timing experiments)
  pp.skip = skip;
  // (rows under an L2 evict-first policy: bench/NOTES.md v18; =0 for A/B runs)
  static const int row_l2_evict = env_knob("DEEP_EP_OPS_ROW_L2_EVICT", 1, 0, 1);
  pp.row_l2_evict = pp.pipelined && !pp.fused && row_l2_evict;
  // (the last tokens in halves, in quarters of the grid's warps: bench/NOTES.md v19)
  static const int split_tail = env_knob("DEEP_EP_OPS_PUSH_SPLIT_TAIL", 0, 0, 64);
  const bool halves_aligned = pp.io.x_bytes % 32 == 0 && pp.io.s_bytes % 32 == 0;
  pp.split_tail = pp.row_l2_evict && halves_aligned ? split_tail : 0;
  if (pp.split_tail > 0) ++st.dispatch_split_tail;
  // this rank's routing outputs are in its slot, written by the peers (their count blocks or
  // pushes): no epilogue
  pp.ends_call = lp.out_r_off >= 0;
  // the count blocks write the send rows and the compact routing rows once their bases are in,
  // off the push's row loop (bench/NOTES.md v20; =0 for A/B runs). Not with one count block
  // (T <= cta_tokens, every decode batch): its CTA is the publisher, whose end the push waits
  // for, while the push's warps have few rows to hide those stores behind.
  static const int routing_by_count = env_knob("DEEP_EP_OPS_ROUTING_BY_COUNT", 1, 0, 1);
  lp.block_routing = pp.routing_by_count = routing_by_count && pp.block_words && !expand &&
                                           count_blocks(static_cast<int>(T), lp.cta_tokens) > 1;
  if (lp.block_routing) {
    lp.topk_w = pp.io.topk_weights;
    lp.recv_idx = static_cast<int64_t*>(pp.io.recv_idx);
    lp.recv_w = pp.io.recv_w;
    lp.handle = pp.io.handle;
    ++st.dispatch_routing_by_count;
  }
  if (!pp.fused) check_cuda(launch_layout(lp, stream), "launching dispatch layout kernel");
  if (R == 1) {
    // one rank: the push writes every output (no window, no barrier, no epilogue)
    check_cuda(launch_dispatch_push(pp, local_ctas(st, num_sms, std::max<int64_t>(T, C)), stream),
                 "launching dispatch push kernel");
    return out;
  }
  // The push's automatic grid is three quarters of the SMs (DEEP_EP_OPS_DISPATCH_GRID_PCT for
  // sweeps): the layout kernel's count CTAs run beside the push, and a push CTA that gets its SM
  // only when one of them exits ends its rows late while its peers wait for it at the barrier
  // (bench/NOTES.md v17: R = 2 with 66 SMs, 48 CTAs instead of 64 end a lone dispatch ~11 us
  // sooner; R = 4 with 32 SMs, 24 instead of 32: the bench 273 -> 254 us).
  static const int grid_percent = env_knob("DEEP_EP_OPS_DISPATCH_GRID_PCT", 75, 1, 100);
  st.last_push_ctas = share_ctas(st, num_sms, grid_percent, M);
  check_cuda(launch_dispatch_push(pp, st.last_push_ctas, stream), "launching dispatch push kernel");
  if (pp.ends_call) {
    ++st.dispatch_direct_routing;
    return out;
  }

  // phase 3: window -> fresh outputs, handle receive part, zero padding
  EpilogueParams ep{};
  ep.io = pp.io;
  ep.win = st.comm.peer_base[st.cfg.rank];
  ep.rows = rows;
  ep.E_loc = E_loc;
  ep.expand = expand;
  ep.direct = slot >= 0;
  ep.s = st.scratch;
  ep.epochs = st.comm.epochs;
  check_cuda(launch_dispatch_epilogue(ep, epilogue_ctas(st, C), stream), "launching dispatch epilogue");
  return out;
}

std::tuple<at::Tensor, at::Tensor> cached_dispatch(EpState& st, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& x_scales,
                                                   const at::Tensor& handle, int64_t num_sms) {
  check_alive(st, "cached_dispatch");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t T = x.size(0), Hx = x.size(1);
  const int64_t C = handle.size(0) - 1 - T;
  const ScaleRows sr = scale_rows(x_scales);
  if (C < 0) throw std::invalid_argument("deep_ep.cached_dispatch: handle has fewer rows than 1 + T");
  if (T > st.cfg.max_tokens)
    throw std::invalid_argument("deep_ep.cached_dispatch: more tokens than num_max_tokens_per_rank");

  CachedParams p{};
  p.x = static_cast<const char*>(x.data_ptr());
  p.scales = x_scales.has_value() ? static_cast<const char*>(x_scales->data_ptr()) : nullptr;
  p.handle = handle.data_ptr<int>();
  p.x_bytes = Hx * static_cast<int64_t>(x.element_size());
  p.s_bytes = sr.cols * 4;
  const EpWindow::Staging staging = st.win.cached_staging(st.cfg.max_tokens, p.x_bytes, p.s_bytes);
  p.x_stride = staging.x_stride;
  p.s_stride = staging.s_stride;
  p.x_off = staging.x_off;
  p.s_off = staging.s_off;
  check_fits(st, "cached_dispatch", staging.end);

  at::Tensor out_x = empty({C, Hx}, x.scalar_type(), x.device());
  at::Tensor out_s = empty({C, sr.cols}, sr.dtype, x.device());
  p.out_x = static_cast<char*>(out_x.data_ptr());
  p.out_s = static_cast<char*>(out_s.data_ptr());
  p.T = static_cast<int>(T);
  p.C = static_cast<int>(C);
  p.K = st.cfg.topk;
  p.W = st.handle_width;
  p.comm = st.comm;
  // one rank: the pull kernel alone, on any grid
  const int pull_ctas = st.cfg.num_ranks == 1 ? local_ctas(st, num_sms, C) : barrier_ctas(st, num_sms);
  check_cuda(launch_cached_dispatch(p, barrier_ctas(st, num_sms), pull_ctas, stream),
               "launching cached_dispatch kernels");
  return {out_x, out_s};
}

at::Tensor combine(EpState& st, const at::Tensor& x, const at::Tensor& handle,
                   const std::optional<at::Tensor>& weights, int64_t num_sms) {
  check_alive(st, "combine");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const int64_t C = x.size(0), Wd = x.size(1);
  const int64_t T = handle.size(0) - 1 - C;
  if (T < 0) throw std::invalid_argument("deep_ep.combine: handle has fewer rows than 1 + C");
  if (T > st.cfg.max_tokens)
    throw std::invalid_argument("deep_ep.combine: more tokens than num_max_tokens_per_rank");
  CombineParams p{};
  switch (x.scalar_type()) {
    case at::kFloat: p.dtype = 0; break;
    case at::kBFloat16: p.dtype = 1; break;
    case at::kHalf: p.dtype = 2; break;
    default:
      throw std::invalid_argument("deep_ep.combine: the CUDA backend takes bf16, fp16 or fp32 x");
  }
  at::Tensor w;
  if (weights.has_value()) w = weights->scalar_type() == at::kFloat ? *weights : weights->to(at::kFloat);
  p.num_slots = std::min(st.cfg.num_ranks, st.cfg.topk);
  p.stage_off = st.win.combine_stage_off();
  check_fits(st, "combine", p.stage_off + EpWindow::combine_stage_bytes(st.cfg.max_tokens,
                                                                         p.num_slots, Wd));
  at::Tensor out = empty({T, Wd}, x.scalar_type(), x.device());
  p.x = x.data_ptr();
  p.weights = w.defined() ? w.data_ptr<float>() : nullptr;
  p.handle = handle.data_ptr<int>();
  p.out = out.data_ptr();
  p.stage_raw = w.defined() ? 0 : 1;  // the kernels also require the compact layout
  p.x_in_place = in_place_offset(st, x, w.defined());
  note_combine_input_used(st, x);
  p.cins_off = st.win.cins_off;
  p.zero_copy = st.win.num_cin_slots > 0;
  p.reduce_via_smem = combine_reduce_via_smem(st);
  p.reduce_ticket = st.scratch.combine_ticket;
  // rows that travel as is (compact layout, no weights: the kernel checks the layout)
  if (st.cfg.num_ranks > 1 && p.stage_raw && p.x_in_place < 0)
    p.bulk_row_bytes = bulk_rows(st, Wd * static_cast<int64_t>(x.element_size()), !off16(x.data_ptr()));
  if (st.cfg.num_ranks > 1) ++(p.x_in_place >= 0 ? st.combine_in_place : st.combine_pushed);
  p.Wd = static_cast<int>(Wd);
  p.C = static_cast<int>(C);
  p.T = static_cast<int>(T);
  p.K = st.cfg.topk;
  p.W = st.handle_width;
  p.comm = st.comm;
  // one rank: the local reduce alone (reads x), one warp per token
  const int reduce_ctas = st.cfg.num_ranks == 1 ? local_ctas(st, num_sms, T) : epilogue_ctas(st, T);
  // the barrier kernel's automatic grid: every SM (DEEP_EP_OPS_COMBINE_GRID_PCT for sweeps: at
  // R = 2 the combine ran faster at 24 SMs than at 66, bench/NOTES.md v17, not yet swept)
  static const int grid_percent = env_knob("DEEP_EP_OPS_COMBINE_GRID_PCT", 100, 1, 100);
  check_cuda(launch_combine(p,
                             share_ctas(st, num_sms, grid_percent,
                                        static_cast<int64_t>(st.cfg.num_ranks) * st.cfg.max_tokens),
                             reduce_ctas, stream),
               "launching combine kernels");
  return out;
}

at::Tensor combine_input(EpState& st, int64_t rows, int64_t width, at::ScalarType dtype) {
  check_alive(st, "combine_input");
  if (st.win.num_cin_slots == 0)
    throw std::invalid_argument("deep_ep_ops.Buffer.combine_input: this Buffer has no combine-input "
                                "slots; create it with zero_copy_combine=True");
  const int64_t bytes = rows * width * static_cast<int64_t>(c10::elementSize(dtype));
  if (rows < 0 || width < 1 || bytes > st.win.cin_slot_bytes)
    throw std::invalid_argument(
        "deep_ep_ops.Buffer.combine_input: [" + std::to_string(rows) + ", " + std::to_string(width) +
        "] " + c10::toString(dtype) + " needs " + std::to_string(bytes) + " bytes; a slot holds " +
        std::to_string(st.win.cin_slot_bytes) + " (R*M rows of hidden bf16)");
  // Slots alternate. A slot handed out again may still be read by the peers' reduces of the
  // combine that used it last, unless another combine ran since (its first barrier waits for
  // them): so every handed-out tensor must reach combine before the next one is asked for.
  if (st.cin_pending.load() >= 0)
    throw std::runtime_error(
        "deep_ep_ops.Buffer.combine_input: pass the last combine_input() tensor to combine first "
        "(the slots alternate, and the peers may still read the one this call would hand out)");
  const int i = st.next_cin.fetch_add(1) % st.win.num_cin_slots;
  st.cin_pending.store(i);
  const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(st.cfg.device));
  return at::from_blob(st.comm.peer_base[st.cfg.rank] + st.win.cin_slot_off(i), {rows, width},
                       [](void*) {}, at::TensorOptions().dtype(dtype).device(dev), dev);
}

}  // namespace deep_ep_ops
