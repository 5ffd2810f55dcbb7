// pp_send_recv kernels.
//
// Inline path (messages up to lay.pp_inline_bytes): ONE 1-CTA kernel does the whole exchange.
// Each (src -> dst) direction has a ring of pp_slots slots in dst's window; the k-th message
// (k from the device counters, 1-based) uses slot (k-1) % slots. The sender waits until dst
// consumed message k - slots (credit), stores the payload over NVLink, then publishes k; the
// receiver waits for k, copies out and returns the credit. So up to pp_slots messages per
// direction may be in flight, FIFO, and slot choice never depends on a host counter.
//
// Bulk path: the copy engine moves the payload (host side, channel_ops.cpp); these 1-thread
// kernels only signal: acquire the single bulk slot of a direction (wait until the receiver
// released it), announce chunk k, wait for chunk k (and reset it), release the slot.
#include "channel_sync.cuh"

namespace deep_ep_ops {
namespace {

constexpr int kInlineThreads = 512;
constexpr int64_t kSlotHeader = 16;  // uint64 payload size, then padding

__device__ __forceinline__ char* ring_slot(char* base, const ChannelLayout& lay, int src,
                                           uint32_t seq) {
  const int slot = static_cast<int>((seq - 1u) % static_cast<uint32_t>(lay.pp_slots));
  return base + lay.pp_ring_off + (static_cast<int64_t>(src) * lay.pp_slots + slot) * lay.pp_slot_stride;
}

__global__ void __launch_bounds__(kInlineThreads, 1) pp_inline_kernel(const __grid_constant__ PpInlineParams p) {
  const ChannelComm& c = p.comm;
  __shared__ int ok;
  if (p.dst >= 0) {
    const uint32_t seq = c.ctr->pp_sent[p.dst] + 1u;
    if (threadIdx.x == 0) {
      ok = 1;
      // Slot (seq-1) % slots last held message seq - slots: wait until dst consumed it.
      if (seq > static_cast<uint32_t>(p.lay.pp_slots) &&
          !chan::wait_geq(chan::my_flag(c, kFlagPpCredit, p.dst), seq - p.lay.pp_slots, c,
                         kOpPpInlineSend, p.dst))
        ok = 0;
    }
    __syncthreads();
    char* slot = ring_slot(c.peer_base[p.dst], p.lay, c.rank, seq);
    if (ok) {
      if (threadIdx.x == 0)
        *reinterpret_cast<unsigned long long*>(slot) = static_cast<unsigned long long>(p.send_bytes);
      chan::cta_copy(slot + kSlotHeader, p.send, p.send_bytes);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // payload before the sequence number
      dev::release_flag_sys(chan::peer_flag(c, p.dst, kFlagPpArrive), seq);
      c.ctr->pp_sent[p.dst] = seq;
    }
  }
  if (p.src >= 0) {
    const uint32_t seq = c.ctr->pp_recv[p.src] + 1u;
    char* slot = ring_slot(c.peer_base[c.rank], p.lay, p.src, seq);
    __syncthreads();
    if (threadIdx.x == 0) {
      ok = chan::wait_geq(chan::my_flag(c, kFlagPpArrive, p.src), seq, c, kOpPpInlineRecv, p.src);
      if (ok) {
        const unsigned long long got = __ldcg(reinterpret_cast<const unsigned long long*>(slot));
        if (got != static_cast<unsigned long long>(p.recv_bytes)) {
          chan::report(c, kErrSizeMismatch, kOpPpInlineRecv, p.src,
                      static_cast<uint32_t>(p.recv_bytes), static_cast<uint32_t>(got));
          ok = 0;
        }
      }
    }
    __syncthreads();
    if (ok) chan::cta_copy(p.recv, slot + kSlotHeader, p.recv_bytes);
    __syncthreads();
    if (threadIdx.x == 0) {
      // our loads of the slot are done before the credit frees it
      dev::release_flag_sys(chan::peer_flag(c, p.src, kFlagPpCredit), seq);
      c.ctr->pp_recv[p.src] = seq;
    }
  }
}

__global__ void pp_bulk_kernel(const __grid_constant__ PpBulkParams p) {
  const ChannelComm& c = p.comm;
  switch (p.mode) {
    case kPpAcquire: {
      // The receiver clears busy after copying our previous bulk message out of its slot.
      uint32_t* busy = chan::my_flag(c, kFlagPpBusy, p.peer);
      chan::wait_until(busy, [](uint32_t v) { return v == 0u; }, c, kOpPpBulkSend, p.peer, 0u);
      *reinterpret_cast<volatile uint32_t*>(busy) = 1u;
      __threadfence_system();
      break;
    }
    case kPpSignal: {
      // Runs after the copy engine finished chunk `chunk` (stream / event order).
      if (p.chunk == 0) {
        const uint64_t b = static_cast<uint64_t>(p.bytes);
        *reinterpret_cast<volatile uint32_t*>(chan::peer_flag(c, p.peer, kFlagPpSizeLo)) =
            static_cast<uint32_t>(b);
        *reinterpret_cast<volatile uint32_t*>(chan::peer_flag(c, p.peer, kFlagPpSizeHi)) =
            static_cast<uint32_t>(b >> 32);
      }
      dev::release_flag_sys(chan::peer_flag(c, p.peer, kFlagPpChunk0 + p.chunk), 1u);
      break;
    }
    case kPpWait: {
      uint32_t* f = chan::my_flag(c, kFlagPpChunk0 + p.chunk, p.peer);
      if (!chan::wait_until(f, [](uint32_t v) { return v != 0u; }, c, kOpPpBulkRecv, p.peer, 1u))
        break;
      // Reset before the sender may announce this chunk of its next message: it cannot, as
      // it waits for our release, which follows this kernel.
      *reinterpret_cast<volatile uint32_t*>(f) = 0u;
      if (p.chunk == 0) {
        const uint64_t got =
            static_cast<uint64_t>(dev::ld_acquire_sys(chan::my_flag(c, kFlagPpSizeLo, p.peer))) |
            (static_cast<uint64_t>(dev::ld_acquire_sys(chan::my_flag(c, kFlagPpSizeHi, p.peer)))
             << 32);
        if (got != static_cast<uint64_t>(p.bytes))
          chan::report(c, kErrSizeMismatch, kOpPpBulkRecv, p.peer,
                      static_cast<uint32_t>(p.bytes), static_cast<uint32_t>(got));
      }
      break;
    }
    case kPpRelease: {
      // Runs after our copy-out of the slot finished (stream order).
      dev::release_flag_sys(chan::peer_flag(c, p.peer, kFlagPpBusy), 0u);
      break;
    }
    default:
      break;
  }
}

}  // namespace

cudaError_t launch_pp_inline(const PpInlineParams& p, cudaStream_t stream) {
  pp_inline_kernel<<<1, kInlineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_pp_bulk(const PpBulkParams& p, cudaStream_t stream) {
  pp_bulk_kernel<<<1, 1, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace deep_ep_ops
