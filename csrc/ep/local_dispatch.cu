// Dispatch with one rank, compact layout, static capacity: a local permute, done by ONE kernel
// instead of the layout kernel + push kernel pair (whose boundary, last-CTA ticket and serial
// scan cost ~17 us on H100 before the first byte moved).
//
// Compact row of a token = number of valid tokens (any expert id >= 0) before it. Each CTA
// takes a ticket (its tile id, so every lower tile belongs to a CTA that has already started
// and waiting for it cannot deadlock, whatever else shares the GPU), counts its contiguous
// tile of tokens, publishes the count with a per-call tag, and sums the counts of the lower
// tiles in parallel (single-pass scan with a full look-back: at most one load per lower tile).
// The rows are then a pure function of the routing, identical to the layout + push path.
// The DRAM would idle during the count and the look-back: the tile's first rows stream into
// L2 (bulk prefetches issued after the id loads), and once its own count is published every
// warp loads the first 4 KiB of its first row into registers, stored when the look-back ends.
// The highest tile learns the total G from its own scan: it writes the handle header and the
// rows of invalid tokens [G, T). Tokens per expert are integer sums (atomics into a zeroed
// accumulator: order-free); the last tile to add its histogram (a ticket taken right after the
// look-back, not after the copy, so nobody waits for rows to drain) copies them out and
// resets the tickets. Rows [T, C) never carry a token and are filled by every CTA in parallel.
#include "ep_barrier.cuh"
#include "../host/cuda_check.hpp"
#include "topk_loads.cuh"
#include "fill_rows.cuh"
#include "handle_rows.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
// Rows per tile prefetched into L2 before the scan. H100, T = 4096 FP8 (bench/NOTES.md v5):
// all 31 rows 31.1 us, none 30.8, 2 30.1, 4 29.8, 8 29.9.
constexpr int kPrefetchRows = 4;
// int4 per lane of a warp's first row held in registers across the look-back (4 KiB a warp;
// more spills at 128 registers).
constexpr int kHead = 8;

// The tile counts carry their call's tag in the same word, so they need no ordering against
// other memory: relaxed accesses (a release would make the publishing thread wait for its
// own outstanding loads and prefetches first).
__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_gpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned atom_add_acq_rel_gpu(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// Count of `tile` in this call; waits (with the Buffer's timeout) until it is published.
__device__ __forceinline__ int tile_count(const unsigned long long* status, int tile,
                                          unsigned tag, const Comm& c) {
  unsigned long long v = ld_relaxed_gpu(status + tile);
  if (static_cast<unsigned>(v >> 32) != tag) {
    const unsigned long long start = now_ns();
    while (static_cast<unsigned>((v = ld_relaxed_gpu(status + tile)) >> 32) != tag) {
      if (now_ns() - start > c.wait.timeout_ns) {
        record_failure(c.wait, kErrTimeout, kOpLocalTiles, tile, c.rank, tag,
                       static_cast<unsigned>(v >> 32));
        return 0;
      }
    }
  }
  return static_cast<int>(v & 0xffffffffu);
}

// Sum of v over the CTA (every thread gets it). red: kWarps ints of shared memory.
__device__ __forceinline__ int block_sum(int v, int* red) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // red may still be read by a previous call
  if (lane_id() == 0) red[warp_id()] = v;
  __syncthreads();
  int s = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w];
  return s;
}

__global__ void __launch_bounds__(kThreads, 1) local_dispatch_kernel(LocalDispatchParams p) {
  extern __shared__ int smem[];
  int* hist = smem;              // [E] this tile's tokens per expert
  int* tok_row = hist + p.io.E;  // [tile tokens] row among the tile's valid tokens, -1: invalid
  __shared__ int red[kWarps];
  __shared__ unsigned tile_tag[2];
  pdl_wait();
  pdl_trigger();
  const unsigned long long t_start = global_ns();  // phase stamps: recv_info[3..7]
  const int T = p.io.T, K = p.io.K, E = p.io.E, W = p.io.W;
  const int lane = lane_id(), warp = warp_id();
  const int64_t xb = p.io.x_bytes, sb = p.io.s_bytes;
  if (threadIdx.x == 0) {
    tile_tag[0] = atomicAdd(p.s.tile_ctr, 1u);
    tile_tag[1] = *reinterpret_cast<volatile unsigned*>(p.s.tile_ctr + 2) + 1u;
  }
  for (int e = threadIdx.x; e < E; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int tile = static_cast<int>(tile_tag[0]);
  const unsigned tag = tile_tag[1];
  const int nb = gridDim.x;
  const int lo = static_cast<int>(static_cast<int64_t>(tile) * T / nb);
  const int hi = static_cast<int>(static_cast<int64_t>(tile + 1) * T / nb);
  const int n = hi - lo;

  // ---- count: validity and rank among the tile's valid tokens, per-expert histogram ----
  int valid_in_tile = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    bool valid = false;
    if (i < n) {
      const int64_t t = lo + i;
      for (int k0 = 0; k0 < K; k0 += 8) {
        int ids[8];  // all loads in flight before the first atomic
#pragma unroll
        for (int u = 0; u < 8; ++u)
          ids[u] = k0 + u < K ? load_expert(p.io.topk_idx, p.io.idx64, t * K + k0 + u) : -1;
        if (k0 == 0 && i < kPrefetchRows) {
          // after the id loads: they are the critical path
          prefetch_l2(p.io.x + t * xb, xb);
          if (sb > 0) prefetch_l2(p.io.scales + t * sb, sb);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (ids[u] >= 0 && ids[u] < E) {
            valid = true;
            atomicAdd(&hist[ids[u]], 1);  // integer sum: order-free (ids distinct in a row)
          }
        }
      }
    }
    const unsigned bal = __ballot_sync(0xffffffffu, valid);
    if (lane == 0) red[warp] = __popc(bal);
    __syncthreads();
    int before = valid_in_tile;
    for (int w = 0; w < warp; ++w) before += red[w];
    if (i < n) tok_row[i] = valid ? before + __popc(bal & lanemask_lt()) : -1;
    for (int w = 0; w < kWarps; ++w) valid_in_tile += red[w];
    __syncthreads();
  }
  if (threadIdx.x == kThreads - 1) {  // a thread with no prefetch of its own in flight
    st_relaxed_gpu(p.s.tile_status + tile,
                   (static_cast<unsigned long long>(tag) << 32) | static_cast<unsigned>(valid_in_tile));
  }
  // Own count published: the first 4 KiB of this warp's first row, in registers until the
  // look-back gives its row (valid or not: its validity is in shared memory, not yet read).
  int4 head[kHead];
  const bool use_head = p.head_loads && warp < n;
  if (use_head) {
    const int4* src = reinterpret_cast<const int4*>(p.io.x + (lo + warp) * xb);
    const int cnt = static_cast<int>(xb / 16);
#pragma unroll
    for (int u = 0; u < kHead; ++u)
      if (lane + u * kWarp < cnt) head[u] = src[lane + u * kWarp];
  }
  for (int e = threadIdx.x; e < E; e += kThreads)
    if (hist[e] != 0) atomicAdd(p.s.tpe_acc + e, hist[e]);

  const unsigned long long t_counted = global_ns();

  // ---- rows before this tile: the counts of every lower tile (all already running) ----
  int below = 0;
  for (int j = threadIdx.x; j < tile; j += kThreads) below += tile_count(p.s.tile_status, j, tag, p.comm);
  below = block_sum(below, red);  // ends with a barrier: every histogram atomic was issued
  const unsigned long long t_scanned = global_ns();
  // Tiles done adding histograms: taken now, so the last one copies tokens_per_expert without
  // waiting for anybody's rows to drain. Its release covers the other threads' histogram
  // atomics through the barrier above; its acquire, the last tile's loads of the sums.
  unsigned done_ticket = 0;
  if (threadIdx.x == (kWarps - 1) * kWarp) done_ticket = atom_add_acq_rel_gpu(p.s.tile_ctr + 1, 1u);
  if (use_head && tok_row[warp] >= 0) {  // the rest of the row's x; its scales in the loop
    const int64_t row = below + tok_row[warp];
    const int64_t t = lo + warp;
    int4* dst = reinterpret_cast<int4*>(p.io.recv_x + row * xb);
    const int cnt = static_cast<int>(xb / 16);
#pragma unroll
    for (int u = 0; u < kHead; ++u)
      if (lane + u * kWarp < cnt) dst[lane + u * kWarp] = head[u];
    const int64_t done = static_cast<int64_t>(kHead) * kWarp * 16;
    if (xb > done) warp_copy(p.io.recv_x + row * xb + done, p.io.x + t * xb + done, xb - done);
  }
  int* recv_h = handle_row(p.io.handle, T, W);
  FillArgs fa{nullptr, p.io.recv_x, p.io.recv_s, p.io.recv_idx, p.io.recv_w, p.io.tpe, recv_h,
              p.io.x_bytes, p.io.s_bytes, p.io.C, K, W, E, 0};
  if (tile == nb - 1) {
    // The highest tile knows the total G = its base + its count: header row, and the rows of
    // invalid tokens [G, T) (nobody else writes them).
    const int G = below + valid_in_tile;
    if (threadIdx.x == 0) {
      write_header_row(p.io.handle, W,
                       HandleHeader{G, G, T, 1, E, p.M, 0, p.A, K, p.buffer_id, p.io.C});
      p.s.recv_info[kRecvG] = G;
    }
    zero_compact_rows(fa, G, T, threadIdx.x, kThreads, warp, kWarps);
  }

  // ---- copy: one warp per token; outputs, routing tensors, handle send and receive rows ----
  for (int i = warp; i < n; i += kWarps) {
    const int t = lo + i;
    const int r = tok_row[i];
    const int row = r >= 0 ? below + r : -1;
    int e;
    float wgt;
    load_slot(p.io, t, e, wgt);
    // slot k goes to rank 0 (the only one) at the token's row, or nowhere
    warp_write_send_row(handle_row(p.io.handle, t, W), W, K,
                        row >= 0 ? 1 : 0, e >= 0 ? 0 : -1, e >= 0 ? row : -1);
    if (row < 0) continue;
    if (!(i == warp && use_head))  // else x went out with the head, before the loop
      warp_copy(p.io.recv_x + static_cast<int64_t>(row) * xb, p.io.x + static_cast<int64_t>(t) * xb, xb);
    if (sb > 0)
      warp_copy(p.io.recv_s + static_cast<int64_t>(row) * sb, p.io.scales + static_cast<int64_t>(t) * sb, sb);
    if (lane < K) {
      static_cast<int64_t*>(p.io.recv_idx)[static_cast<int64_t>(row) * K + lane] = e >= 0 ? e : -1;
      p.io.recv_w[static_cast<int64_t>(row) * K + lane] = e >= 0 ? wgt : 0.f;
    }
    warp_write_compact_recv_row(recv_h + static_cast<int64_t>(row) * W, W, 0, t, row, 0);
  }

  // ---- rows [T, C) never carry a token: every CTA fills its share now ----
  zero_compact_rows(fa, T, p.io.C, static_cast<int64_t>(tile) * kThreads + threadIdx.x,
                    static_cast<int64_t>(nb) * kThreads, static_cast<int64_t>(tile) * kWarps + warp,
                    static_cast<int64_t>(nb) * kWarps);
  const unsigned long long t_copied = global_ns();

  // ---- the last tile to add its histogram: tokens_per_expert, then the tickets' reset ----
  if (warp != kWarps - 1) return;
  if (__shfl_sync(0xffffffffu, done_ticket, 0) != static_cast<unsigned>(nb - 1)) return;
  __syncwarp();  // orders the other lanes' loads after lane 0's acquire
  for (int e = lane; e < E; e += kWarp) {
    p.io.tpe[e] = __ldcg(p.s.tpe_acc + e);
    p.s.tpe_acc[e] = 0;  // ready for the next call
  }
  if (lane == 0) {
    int* info = p.s.recv_info;  // this CTA's phases, ns from its start (after pdl_wait)
    info[3] = static_cast<int>(t_counted - t_start);
    info[4] = static_cast<int>(t_scanned - t_start);
    info[5] = static_cast<int>(t_copied - t_start);
    info[6] = static_cast<int>(global_ns() - t_start);
    info[7] = tile;
    p.s.tile_ctr[0] = 0u;  // every CTA took its tile ticket before its done ticket
    p.s.tile_ctr[1] = 0u;
    p.s.tile_ctr[2] = tag;
  }
}

}  // namespace

cudaError_t launch_local_dispatch(const LocalDispatchParams& params, int ctas, cudaStream_t stream) {
  LocalDispatchParams p = params;
  ctas = ctas < 1 ? 1 : (ctas > kMaxLocalTiles ? kMaxLocalTiles : ctas);
  const int tile_tokens = (p.io.T + ctas - 1) / ctas;
  p.head_loads = (p.io.x_bytes & 15) == 0 &&
                 ((reinterpret_cast<uintptr_t>(p.io.x) | reinterpret_cast<uintptr_t>(p.io.recv_x)) & 15) == 0;
  const size_t smem = static_cast<size_t>(p.io.E + tile_tokens) * sizeof(int);
  static const int room = raise_dynamic_smem_limit(reinterpret_cast<const void*>(local_dispatch_kernel));
  if (smem > static_cast<size_t>(room)) return cudaErrorInvalidValue;
  return launch_pdl(local_dispatch_kernel, ctas, kThreads, smem, stream, p);
}

}  // namespace deep_ep_ops
