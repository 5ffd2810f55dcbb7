// Host side of pp / cp / engram: choose the path (one 1-CTA kernel for small messages, copy
// engine + 1-thread signalling kernels for bulk ones), allocate fresh outputs on the current
// stream, enqueue. No host sync; every address given to a cudaMemcpyAsync depends only on the
// call's shapes and the Buffer, never on a per-call host counter, so captured graphs replay.
#include "channel_ops.hpp"
#include "../host/cuda_check.hpp"
#include "../host/error_record.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace deep_ep_ops {
namespace {

constexpr int kCopyStreams = 4;         // bulk cp copies to / from different peers in parallel
constexpr int64_t kChunkMin = 8LL << 20;  // pp bulk messages of >= 2 chunks are pipelined

// Event slots of ChannelState (reused call after call: a wait binds to the record before it).
constexpr int kEvFork = 0;
constexpr int kEvJoin0 = 1;                      // .. kEvJoin0 + kCopyStreams
constexpr int kEvChunk0 = kEvJoin0 + kCopyStreams;  // .. + kPpMaxChunks
static_assert(kEvChunk0 + kPpMaxChunks <= ChannelState::kNumEvents, "event pool too small");

// A bad Engram index leaves the protocol intact (the row was zeroed): it is raised once, by
// raise_bad_index() AFTER the op was enqueued. Raising it before would make this rank alone skip
// a collective (or a pp message) that its peers do make: they would time out, or hang without a
// timeout in engram_table's window allocation.
void check_channel_state(ChannelState& st, const char* op) {
  if (!st.alive())
    throw std::runtime_error(std::string("deep_ep.") + op +
                             ": the Buffer's CUDA state was destroyed");
  raise_if_broken(st.error_host, op);
}

// Called once the op is enqueued (its protocol steps match the peers'): raise a pending bad
// Engram index once; the Buffer goes on.
void raise_bad_index(ChannelState& st, const char* op) {
  volatile ErrorRecord* e = st.error_host;
  if (e == nullptr || e->code != kErrBadIndex) return;
  const std::string what = describe_failure(read_error_record(st.error_host));
  e->code = 0;
  throw std::invalid_argument(std::string("deep_ep.") + op + ": an earlier call on this Buffer: " +
                              what + " (set DEEP_EP_OPS_VALIDATE=1 to check indices before "
                              "launch)");
}

cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// Side streams forked from `main` on demand (at first use) and joined back by join(): the join is what makes
// a capture legal and lets the caching allocator treat every buffer as used on `main` only.
class Forks {
 public:
  Forks(ChannelState& st, cudaStream_t main, int device) : st_(st), main_(main), device_(device) {}
  cudaStream_t get(int i) {
    if (!used_[i]) {
      streams_[i] = at::cuda::getStreamFromPool(false, device_).stream();
      // The side stream starts after everything enqueued on `main` so far (a later fork
      // re-records the event; each wait binds to the record just before it).
      check_cuda(cudaEventRecord(st_.event(kEvFork), main_), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(streams_[i], st_.event(kEvFork), 0), "cudaStreamWaitEvent");
      used_[i] = true;
    }
    return streams_[i];
  }
  // Stream of the i-th of several parallel copies: `main`, then the side streams in turn.
  cudaStream_t round_robin(int i) { return i % kCopyStreams == 0 ? main_ : get(i % kCopyStreams); }
  void join() {
    for (int i = 0; i < kCopyStreams; ++i) {
      if (!used_[i]) continue;
      check_cuda(cudaEventRecord(st_.event(kEvJoin0 + i), streams_[i]), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(main_, st_.event(kEvJoin0 + i), 0), "cudaStreamWaitEvent");
      used_[i] = false;
    }
  }
  ~Forks() {
    try {
      join();
    } catch (...) {
    }
  }

 private:
  ChannelState& st_;
  cudaStream_t main_;
  int device_;
  bool used_[kCopyStreams] = {};
  cudaStream_t streams_[kCopyStreams] = {};
};

// Bulk cp ops stage at most cp_max_bytes in this rank's cp slot.
void check_cp_capacity(const ChannelState& st, const char* what, int64_t bytes) {
  if (bytes > st.lay.cp_max_bytes)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(bytes) +
                                " bytes, more than the Buffer's cp_max_bytes=" +
                                std::to_string(st.lay.cp_max_bytes) +
                                "; create the Buffer with a larger cp_max_bytes");
}

// True when [p, p + bytes) shares memory with this rank's cp slot (a cp_input view or part of
// one), which the op's own staging or the peers' pushes would overwrite.
bool overlaps_cp_slot(const ChannelState& st, const char* p, int64_t bytes) {
  const char* slot = st.local_base() + st.lay.cp_bulk_off;
  return p < slot + st.lay.cp_max_bytes && p + bytes > slot;
}

void copy_async(void* dst, const void* src, int64_t bytes, cudaStream_t s) {
  if (bytes <= 0) return;
  check_cuda(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice, s),
             "cudaMemcpyAsync");
}

int channel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kDouble: return kF64;
    case at::kInt: return kI32;
    case at::kLong: return kI64;
    default: return -1;
  }
}

// Bulk pp messages: chunk count and length are functions of the byte size alone, so sender and
// receiver agree without talking.
// The one-kernel path of a small cp op (block_bytes: all-gather, x; reduce-scatter, one output
// block); the reduce-scatter fields are set by its caller.
CpInlineParams cp_inline_params(const ChannelState& st, const char* x, char* out, int64_t block_bytes) {
  CpInlineParams p{};
  p.x = x;
  p.out = out;
  p.block_bytes = block_bytes;
  p.lay = st.lay;
  p.comm = st.comm;
  return p;
}

int pp_chunks(int64_t bytes) {
  if (bytes < 2 * kChunkMin) return 1;
  return static_cast<int>(std::min<int64_t>(kPpMaxChunks, bytes / kChunkMin));
}

}  // namespace

// ---- pp_send_recv --------------------------------------------------------------------------------

static at::Tensor pp_send_recv_impl(ChannelState& st, const at::Tensor& send, int64_t dst,
                                    int64_t src, const std::vector<int64_t>& recv_shape,
                                    at::ScalarType recv_dtype) {
  check_channel_state(st, "pp_send_recv");
  c10::cuda::CUDAGuard guard(send.device());
  const int me = st.cfg.rank;
  at::Tensor out = src >= 0 ? at::empty(recv_shape, send.options().dtype(recv_dtype))
                            : at::empty({0}, send.options().dtype(recv_dtype));
  if ((dst == me) != (src == me))
    throw std::invalid_argument("deep_ep.pp_send_recv: a rank that sends to itself must also "
                                "receive from itself (dst=" + std::to_string(dst) + ", src=" +
                                std::to_string(src) + ", rank=" + std::to_string(me) + ")");
  cudaStream_t main = current_stream(send);
  if (dst == me) {
    if (send.sizes() != out.sizes() || send.scalar_type() != out.scalar_type())
      throw std::invalid_argument("deep_ep.pp_send_recv: send does not match recv_shape / "
                                  "recv_dtype for a message to this rank itself");
    out.copy_(send);
    return out;
  }
  const at::Tensor payload = dst >= 0 ? send.contiguous() : send;
  const int64_t send_bytes = dst >= 0 ? static_cast<int64_t>(payload.nbytes()) : 0;
  const int64_t recv_bytes = src >= 0 ? static_cast<int64_t>(out.nbytes()) : 0;
  const ChannelLayout& lay = st.lay;
  for (int64_t b : {send_bytes, recv_bytes})
    if (b > lay.pp_inline_bytes && b > lay.pp_max_bytes)
      throw std::invalid_argument(
          "deep_ep.pp_send_recv: a message of " + std::to_string(b) + " bytes exceeds the "
          "Buffer's pp_max_bytes=" + std::to_string(lay.pp_max_bytes) +
          "; create the Buffer with a larger pp_max_bytes");
  const bool send_inline = dst >= 0 && send_bytes <= lay.pp_inline_bytes;
  const bool recv_inline = src >= 0 && recv_bytes <= lay.pp_inline_bytes;
  const bool send_bulk = dst >= 0 && !send_inline;
  const bool recv_bulk = src >= 0 && !recv_inline;
  Forks forks(st, main, send.get_device());

  if (send_bulk) {
    // Copies back to back on one side stream; each chunk's signal on a second one, so the
    // copy engine never idles behind a kernel launch.
    cudaStream_t copy_s = forks.get(0), sig_s = forks.get(1);
    PpBulkParams bp{};
    bp.mode = kPpAcquire;
    bp.peer = static_cast<int>(dst);
    bp.bytes = send_bytes;
    bp.comm = st.comm;
    check_cuda(launch_pp_bulk(bp, copy_s), "launching the pp acquire kernel");
    const int chunks = pp_chunks(send_bytes);
    const int64_t len = align_up((send_bytes + chunks - 1) / chunks, 4096);
    char* slot = st.comm.peer_base[dst] + lay.pp_bulk_off + static_cast<int64_t>(me) * lay.pp_max_bytes;
    const char* from = static_cast<const char*>(payload.data_ptr());
    for (int k = 0; k < chunks; ++k) {
      const int64_t off = k * len, n = std::min(len, send_bytes - off);
      copy_async(slot + off, from + off, n, copy_s);
      check_cuda(cudaEventRecord(st.event(kEvChunk0 + k), copy_s), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(sig_s, st.event(kEvChunk0 + k), 0), "cudaStreamWaitEvent");
      bp.mode = kPpSignal;
      bp.chunk = k;
      check_cuda(launch_pp_bulk(bp, sig_s), "launching the pp signal kernel");
    }
  }
  if (send_inline || recv_inline) {
    PpInlineParams ip{};
    ip.send = send_inline ? static_cast<const char*>(payload.data_ptr()) : nullptr;
    ip.recv = recv_inline ? static_cast<char*>(out.data_ptr()) : nullptr;
    ip.send_bytes = send_inline ? send_bytes : 0;
    ip.recv_bytes = recv_inline ? recv_bytes : 0;
    ip.dst = send_inline ? static_cast<int>(dst) : -1;
    ip.src = recv_inline ? static_cast<int>(src) : -1;
    ip.lay = lay;
    ip.comm = st.comm;
    check_cuda(launch_pp_inline(ip, main), "launching the pp inline kernel");
  }
  if (recv_bulk) {
    const int chunks = pp_chunks(recv_bytes);
    const int64_t len = align_up((recv_bytes + chunks - 1) / chunks, 4096);
    const char* slot = st.local_base() + lay.pp_bulk_off + src * lay.pp_max_bytes;
    char* to = static_cast<char*>(out.data_ptr());
    PpBulkParams bp{};
    bp.peer = static_cast<int>(src);
    bp.bytes = recv_bytes;
    bp.comm = st.comm;
    for (int k = 0; k < chunks; ++k) {
      bp.mode = kPpWait;
      bp.chunk = k;
      check_cuda(launch_pp_bulk(bp, main), "launching the pp wait kernel");
      const int64_t off = k * len;
      copy_async(to + off, slot + off, std::min(len, recv_bytes - off), main);
    }
    bp.mode = kPpRelease;
    check_cuda(launch_pp_bulk(bp, main), "launching the pp release kernel");
  }
  forks.join();
  return out;
}

at::Tensor pp_send_recv(ChannelState& st, const at::Tensor& send, int64_t dst, int64_t src,
                        const std::vector<int64_t>& recv_shape, at::ScalarType recv_dtype) {
  at::Tensor out = pp_send_recv_impl(st, send, dst, src, recv_shape, recv_dtype);
  raise_bad_index(st, "pp_send_recv");
  return out;
}

// ---- cp_all_gather / cp_reduce_scatter ---------------------------------------------------------

at::Tensor cp_input(ChannelState& st, const std::vector<int64_t>& shape, at::ScalarType dtype,
                    int64_t device) {
  check_channel_state(st, "cp_input");
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  check_cp_capacity(st, "deep_ep.cp_input: the view", bytes);
  return at::from_blob(st.local_base() + st.lay.cp_bulk_off, shape,
                       at::TensorOptions().dtype(dtype).device(at::kCUDA, device));
}

static at::Tensor cp_all_gather_impl(ChannelState& st, const at::Tensor& x_in) {
  check_channel_state(st, "cp_all_gather");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  const int R = st.cfg.num_ranks, me = st.cfg.rank;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] *= R;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t B = static_cast<int64_t>(x.nbytes());
  cudaStream_t main = current_stream(x);
  const char* xp = static_cast<const char*>(x.data_ptr());
  if (xp != st.local_base() + st.lay.cp_bulk_off && overlaps_cp_slot(st, xp, B)) {
    // Part of the slot but not a cp_input view of it: the staging copy would overlap itself.
    x = x.clone();
    xp = static_cast<const char*>(x.data_ptr());
  }
  char* op = static_cast<char*>(out.data_ptr());
  if (R == 1 || B == 0) {  // shapes match on every rank, so every rank skips together
    copy_async(op, xp, B, main);
    return out;
  }
  const ChannelLayout& lay = st.lay;
  if (B <= lay.cp_inline_bytes) {
    check_cuda(launch_cp_inline(cp_inline_params(st, xp, op, B), main),
               "launching the cp inline kernel");
    return out;
  }
  check_cp_capacity(st, "deep_ep.cp_all_gather: x", B);
  // Pull design: stage x in this rank's slot (skipped when x already is the slot, see
  // cp_input), barrier, then every rank's copy engines read the peers' slots straight into
  // the fresh output; our own part is copied on a side stream meanwhile. The closing barrier
  // guarantees nobody still reads a slot when the next cp op (or the caller) rewrites it.
  Forks forks(st, main, x.get_device());
  char* slot = st.local_base() + lay.cp_bulk_off;
  copy_async(op + me * B, xp, B, forks.get(0));
  if (xp != slot) copy_async(slot, xp, B, main);
  check_cuda(launch_cp_sync(st.comm, kFlagCpReady, kOpCpReady, true, main), "launching cp sync");
  int i = 0;
  for (int q = 0; q < R; ++q) {
    if (q == me) continue;
    copy_async(op + q * B, st.comm.peer_base[q] + lay.cp_bulk_off, B, forks.round_robin(i));
    ++i;
  }
  forks.join();
  check_cuda(launch_cp_sync(st.comm, kFlagCpDone, kOpCpDone, false, main), "launching cp sync");
  return out;
}

at::Tensor cp_all_gather(ChannelState& st, const at::Tensor& x_in) {
  at::Tensor out = cp_all_gather_impl(st, x_in);
  raise_bad_index(st, "cp_all_gather");
  return out;
}

static at::Tensor cp_reduce_scatter_impl(ChannelState& st, const at::Tensor& x_in) {
  check_channel_state(st, "cp_reduce_scatter");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  const int R = st.cfg.num_ranks, me = st.cfg.rank;
  const int dtype = channel_dtype(x.scalar_type());
  if (dtype < 0)
    throw std::invalid_argument(std::string("deep_ep.cp_reduce_scatter: x must be float32, "
                                            "bfloat16, float16, float64, int32 or int64 on "
                                            "CUDA; got ") + c10::toString(x.scalar_type()));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] /= R;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t B = static_cast<int64_t>(x.nbytes()), blk = B / R, elems = x.numel() / R;
  cudaStream_t main = current_stream(x);
  const char* xp = static_cast<const char*>(x.data_ptr());
  if (overlaps_cp_slot(st, xp, B)) {
    // x lives in the cp slot (a cp_input view): the peers' pushes would overwrite it.
    x = x.clone();
    xp = static_cast<const char*>(x.data_ptr());
  }
  char* op = static_cast<char*>(out.data_ptr());
  if (R == 1 || blk == 0) {  // the sum of one block is the block (the fp32 round trip is exact)
    copy_async(op, xp, blk, main);
    return out;
  }
  const ChannelLayout& lay = st.lay;
  if (blk <= lay.cp_inline_bytes) {
    CpInlineParams p = cp_inline_params(st, xp, op, blk);
    p.block_elems = elems;
    p.reduce = 1;
    p.dtype = dtype;
    check_cuda(launch_cp_inline(p, main), "launching the cp inline kernel");
    return out;
  }
  check_cp_capacity(st, "deep_ep.cp_reduce_scatter: x", B);
  // Push design: block q of x goes to rank q's window, slot `me` (copy engines, several peers
  // in parallel); after the barrier every rank sums its R blocks in rank order.
  {
    Forks forks(st, main, x.get_device());
    int i = 0;
    for (int q = 0; q < R; ++q) {
      if (q == me) continue;
      copy_async(st.comm.peer_base[q] + lay.cp_bulk_off + me * blk, xp + q * blk, blk,
                 forks.round_robin(i));
      ++i;
    }
    forks.join();
  }
  check_cuda(launch_cp_sync(st.comm, kFlagCpReady, kOpCpReady, true, main), "launching cp sync");
  CpReduceParams rp{};
  rp.x_block = xp + me * blk;
  rp.slots = st.local_base() + lay.cp_bulk_off;
  rp.out = op;
  rp.block_elems = elems;
  rp.block_bytes = blk;
  rp.dtype = dtype;
  rp.rank = me;
  rp.num_ranks = R;
  const int64_t words = (blk + 15) / 16;
  const int ctas = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(2LL * st.sm_count, (words + 511) / 512)));
  check_cuda(launch_cp_reduce(rp, ctas, main), "launching the cp reduce kernel");
  check_cuda(launch_cp_sync(st.comm, kFlagCpDone, kOpCpDone, false, main), "launching cp sync");
  return out;
}

at::Tensor cp_reduce_scatter(ChannelState& st, const at::Tensor& x_in) {
  at::Tensor out = cp_reduce_scatter_impl(st, x_in);
  raise_bad_index(st, "cp_reduce_scatter");
  return out;
}

// ---- engram ------------------------------------------------------------------------------------

static at::Tensor engram_table_impl(ChannelState& st, int64_t n, int64_t hidden, at::ScalarType dtype,
                                    int64_t max_rows, int64_t device) {
  check_channel_state(st, "engram_table");
  if (stream_capturing(at::cuda::getCurrentCUDAStream(device).stream()))
    throw std::runtime_error("deep_ep_ops: engram_table allocates symmetric memory "
                             "collectively and cannot run during CUDA graph capture");
  if (n < 1 || hidden < 1)
    throw std::invalid_argument("engram_table: num_entries_per_rank and hidden must be >= 1");
  if (max_rows < 0)
    throw std::invalid_argument("engram_table: max_fetch_rows must be >= 0, got " +
                                std::to_string(max_rows));
  if (static_cast<int64_t>(st.cfg.num_ranks) * n >= (1LL << 31))
    throw std::invalid_argument("engram_table: R * num_entries_per_rank must be < 2^31");
  const int64_t row_bytes = hidden * static_cast<int64_t>(c10::elementSize(dtype));
  // Only float tables other than FP8 are trainable: staging for their backward.
  const bool trainable = channel_dtype(dtype) >= 0 && at::isFloatingType(dtype);
  // The backward's sort keys hold (src rank * max_fetch_rows + position) in their low 32 bits.
  if (trainable && static_cast<int64_t>(st.cfg.num_ranks) * max_rows >= (1LL << 32))
    throw std::invalid_argument("engram_table: R * max_fetch_rows must be < 2^32, got "
                                "max_fetch_rows=" + std::to_string(max_rows));
  EngramTable& t = st.add_engram_table(n, row_bytes, trainable ? max_rows : 0);
  return at::from_blob(t.window.local, {n, hidden},
                       at::TensorOptions().dtype(dtype).device(at::kCUDA, device));
}

at::Tensor engram_table(ChannelState& st, int64_t n, int64_t hidden, at::ScalarType dtype,
                        int64_t max_rows, int64_t device) {
  at::Tensor out = engram_table_impl(st, n, hidden, dtype, max_rows, device);
  raise_bad_index(st, "engram_table");
  return out;
}

static at::Tensor engram_fetch_impl(ChannelState& st, const at::Tensor& table,
                                    const at::Tensor& indices) {
  check_channel_state(st, "engram_fetch");
  const EngramTable* t = st.engram_table();
  if (t == nullptr || table.data_ptr() != t->window.local)
    throw std::invalid_argument("deep_ep.engram_fetch: table must be the shard returned by "
                                "buf.engram_table() (its memory is what peers read)");
  c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor idx = indices.contiguous();
  const int64_t N = idx.size(0), L = idx.size(1), H = table.size(1);
  at::Tensor out = at::empty({N, L * H}, table.options());
  EngramFetchParams p{};
  p.indices = idx.data_ptr();
  p.idx64 = idx.scalar_type() == at::kLong;
  p.out = static_cast<char*>(out.data_ptr());
  p.num_rows = N * L;
  p.t = t->view;
  p.comm = st.comm;
  int lanes = 32;
  while (lanes > 8 && lanes * 16 > p.t.row_bytes) lanes /= 2;
  const int64_t rows_per_cta = static_cast<int64_t>(256 / lanes) * 4;
  p.grid = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(4LL * st.sm_count, (p.num_rows + rows_per_cta - 1) / rows_per_cta)));
  check_cuda(launch_engram_fetch(p, current_stream(table)), "launching engram_fetch");
  return out;
}

at::Tensor engram_fetch(ChannelState& st, const at::Tensor& table, const at::Tensor& indices) {
  at::Tensor out = engram_fetch_impl(st, table, indices);
  raise_bad_index(st, "engram_fetch");
  return out;
}

static at::Tensor engram_scatter_add_impl(ChannelState& st, const at::Tensor& grad_in,
                                          const at::Tensor& indices,
                                          int64_t num_entries, int64_t hidden) {
  check_channel_state(st, "engram_fetch backward");
  const EngramTable* t = st.engram_table();
  if (t == nullptr)
    throw std::invalid_argument("deep_ep._engram_scatter_add: no Engram table on this Buffer");
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor idx = indices.contiguous();
  const int dtype = channel_dtype(grad.scalar_type());
  if (dtype < 0 || !at::isFloatingType(grad.scalar_type()))
    throw std::invalid_argument("deep_ep._engram_scatter_add: grad must be float32, bfloat16, "
                                "float16 or float64");
  if (num_entries != t->view.n || hidden * static_cast<int64_t>(grad.element_size()) != t->view.row_bytes)
    throw std::invalid_argument("deep_ep._engram_scatter_add: grad rows must match the "
                                "registered table (same num_entries, hidden and dtype)");
  const int64_t rows = idx.size(0) * idx.size(1);
  if (grad.numel() != rows * hidden)
    throw std::invalid_argument("deep_ep._engram_scatter_add: grad must be [N, L*hidden] for "
                                "indices [N, L]");
  if (rows > t->view.max_rows)
    throw std::invalid_argument(
        "deep_ep.engram_fetch backward: " + std::to_string(rows) + " fetched rows (N*L) exceed "
        "the staging of the table, max_fetch_rows=" + std::to_string(t->view.max_rows) +
        "; pass a larger max_fetch_rows to buf.engram_table()");
  cudaStream_t main = current_stream(grad);
  const int R = st.cfg.num_ranks;
  EngramStageParams sp{};
  sp.grad = static_cast<const char*>(grad.data_ptr());
  sp.indices = idx.data_ptr();
  sp.idx64 = idx.scalar_type() == at::kLong;
  sp.num_rows = rows;
  sp.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(2LL * st.sm_count, (rows + 7) / 8)));
  sp.t = t->view;
  sp.comm = st.comm;
  check_cuda(launch_engram_stage(sp, main), "launching the engram stage kernel");
  const int64_t num_keys = static_cast<int64_t>(R) * t->view.max_rows;
  at::Tensor keys = at::empty({std::max<int64_t>(num_keys, 1)}, grad.options().dtype(at::kLong));
  EngramKeysParams kp{};
  kp.keys = keys.data_ptr<int64_t>();
  kp.t = t->view;
  kp.comm = st.comm;
  check_cuda(launch_engram_keys(kp, main), "launching the engram keys kernel");
  // Keys are unique (they embed the source position), so any sort is the stable order.
  at::Tensor sorted = num_keys > 0 ? std::get<0>(keys.sort()) : keys;
  at::Tensor out = at::zeros({num_entries, hidden}, grad.options());
  EngramSumParams up{};
  up.keys = sorted.data_ptr<int64_t>();
  up.out = static_cast<char*>(out.data_ptr());
  up.num_keys = num_keys;
  up.hidden = hidden;
  up.dtype = dtype;
  up.grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(4LL * st.sm_count, (num_keys + 7) / 8)));
  up.t = t->view;
  up.comm = st.comm;
  check_cuda(launch_engram_sum(up, main), "launching the engram sum kernel");
  return out;
}

at::Tensor engram_scatter_add(ChannelState& st, const at::Tensor& grad_in, const at::Tensor& indices,
                              int64_t num_entries, int64_t hidden) {
  at::Tensor out = engram_scatter_add_impl(st, grad_in, indices, num_entries, hidden);
  raise_bad_index(st, "engram_fetch backward");
  return out;
}

}  // namespace deep_ep_ops
