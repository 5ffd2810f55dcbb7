// combine: out[t] = sum over t's destination ranks (ascending) of that rank's partial, where a
// partial is the sum over the group's member rows (ascending) of w[row] * x[row].
//
// push (per-CTA barriers at both ends): each rank reduces the groups of the OTHER ranks'
// tokens locally in fp32 and stores the partial into the source rank's window at
// [source token][combine slot]; the slot is the destination's index among the token's
// destination ranks, so slot order is rank order.
// reduce (a token per warp; after each warp's first, tokens by ticket, which the push resets):
// each source adds its slots 0..n-1 in order; its own slot (its own tokens' rows here) is never
// staged: the reduce computes that partial from x itself, in the same order, where
// the slot comes in the sum. With one rank there is nothing to push: combine is the reduce
// alone, no barrier. Every product and sum is rounded to fp32 on its own (__fmul_rn/__fadd_rn
// forbid fma contraction) and every sum starts from its first term, so results equal the
// reference bit for bit. When a partial is exactly the row (no weights, one member per group)
// the row travels as is and is widened at the source.
//
// Zero-copy combine (Buffer(zero_copy_combine=True)): a rank whose x is a combine-input slot of
// its window and that has no weights pushes nothing; it says so to every peer before the push's
// first barrier, and the sources' reduce forms that rank's partials itself from its rows in
// place (the same members, in the same order, with the same rounding), so the sum is the same
// bit for bit. The other ranks push as above; a source mixes both per destination.
//
// Bulk rows (DEEP_EP_OPS_BULK_COPY=1, an experiment, within the spread of the register copies
// at R = 2, bench/NOTES.md v12): a row that travels as is goes by one bulk load into the warp's
// shared buffer and one bulk store to the peer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../device/accumulate.cuh"
#include "../device/bulk_copy.cuh"
#include "../host/cuda_check.hpp"
#include "ep_barrier.cuh"

namespace deep_ep_ops {
namespace {

using namespace dev;  // NOLINT(build/namespaces): .cu file, not a header

template <typename T, int V>
struct alignas(sizeof(T) * V >= 16 ? 16 : sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[V]) {
  static_assert(std::is_same_v<typename Acc<T>::type, float>, "combine sums 16/32-bit floats");
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_acc(pk.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_from_f32(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Chunked row access: a warp covers kWarp * V * U consecutive elements per step; lane l holds
// the V-vectors at element c0 + (u * kWarp + l) * V, u < U (predicated past the row's end, whose
// length is a multiple of V). U vectors per lane are in flight before the first one is used.
// U = 2 for 16-byte vectors of bf16 (8 elements), 4 otherwise: 64 bytes of fp32 per lane and
// term, so the sum, one term and the loads stay in registers.
template <int V>
constexpr int chunk_vecs() { return V >= 8 ? 2 : 4; }

template <typename T, int V, int U>
__device__ __forceinline__ void load_chunk(const T* row, int64_t c0, int64_t Wd,
                                           float (&out)[U][V]) {
  Pack<T, V> pk[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + static_cast<int64_t>(u * kWarp + lane_id()) * V;
    if (c < Wd) pk[u] = *reinterpret_cast<const Pack<T, V>*>(row + c);
  }
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < V; ++i) out[u][i] = to_acc(pk[u].v[i]);
}

template <typename T, int V, int U>
__device__ __forceinline__ void store_chunk(T* row, int64_t c0, int64_t Wd,
                                            const float (&in)[U][V]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + static_cast<int64_t>(u * kWarp + lane_id()) * V;
    if (c < Wd) store_from_f32<T, V>(row + c, in[u]);
  }
}

template <typename T, int V, int U>
__device__ __forceinline__ void load_packs(const T* row, int64_t c0, int64_t Wd,
                                           Pack<T, V> (&pk)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + static_cast<int64_t>(u * kWarp + lane_id()) * V;
    if (c < Wd) pk[u] = *reinterpret_cast<const Pack<T, V>*>(row + c);
  }
}

// A token routed nowhere combines to zeros.
template <int V, int U>
__device__ __forceinline__ void zero_chunk(float (&acc)[U][V]) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[u][i] = 0.f;
}

// acc = term (first) or acc + term, term = w * x (weighted) or x, each rounded on its own.
template <typename T, int V, int U>
__device__ __forceinline__ void add_term(float (&acc)[U][V], const Pack<T, V> (&pk)[U],
                                         float w, bool weighted, bool first) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float v = to_acc(pk[u].v[i]);
      if (weighted) v = __fmul_rn(w, v);
      acc[u][i] = first ? v : __fadd_rn(acc[u][i], v);
    }
}

// The partial of one group at this rank over the chunk at c0: sum over its nm >= 1 member rows
// (lane m holds member m's row in `mrow` and its weight in `mw`) of w * x[row], in member order,
// starting from the first term. Two members' loads are in flight at once.
template <typename T, int V, int U>
__device__ __forceinline__ void group_partial(const T* x, int64_t Wd, int64_t c0, int nm,
                                              int mrow, float mw, bool weighted,
                                              float (&acc)[U][V]) {
  for (int m = 0; m < nm; m += 2) {
    const bool two = m + 1 < nm;
    const int64_t r0 = __shfl_sync(0xffffffffu, mrow, m);
    const float w0 = __shfl_sync(0xffffffffu, mw, m);
    const int64_t r1 = __shfl_sync(0xffffffffu, mrow, (m + 1) & (kWarp - 1));
    const float w1 = __shfl_sync(0xffffffffu, mw, (m + 1) & (kWarp - 1));
    Pack<T, V> a[U], b[U];
    load_packs<T, V, U>(x + r0 * Wd, c0, Wd, a);
    if (two) load_packs<T, V, U>(x + r1 * Wd, c0, Wd, b);
    add_term<T, V, U>(acc, a, w0, weighted, m == 0);
    if (two) add_term<T, V, U>(acc, b, w1, weighted, false);
  }
}

// Lane m < nm gets member m of the group (rows ascending) and its weight. `mine`: lanes whose
// slot row belongs to the group. Expert-major rows of one token are distinct; compact groups
// have one member (every slot names the same compact row).
__device__ __forceinline__ int members_to_lanes(int row, unsigned mine, bool expand,
                                                const float* weights, int* mrow, float* mw) {
  const int lane = lane_id();
  int nm;
  *mrow = -1;
  if (!expand) {
    nm = 1;
    const int r = __shfl_sync(0xffffffffu, row, __ffs(mine) - 1);
    if (lane == 0) *mrow = r;
  } else {
    nm = __popc(mine);
    const bool in = (mine >> lane) & 1u;
    int pos = 0;  // rank of my row among the group's rows
    for (unsigned m = mine; m != 0; m &= m - 1) {
      const int rk = __shfl_sync(0xffffffffu, row, __ffs(m) - 1);
      if (in && rk < row) ++pos;
    }
    for (unsigned m = mine; m != 0; m &= m - 1) {
      const int k = __ffs(m) - 1;
      const int rk = __shfl_sync(0xffffffffu, row, k);
      const int pk = __shfl_sync(0xffffffffu, pos, k);
      if (lane == pk) *mrow = rk;
    }
  }
  *mw = (weights != nullptr && lane < nm) ? weights[*mrow] : 1.f;
  return nm;
}

// The token's destination ranks in rank order, which is the order of its sum and of its
// staging slots: `first` on the first of the K lanes naming each rank, `pos` that rank's place
// (on its first lane), `firsts` the first lanes. Every lane of the warp must call it.
struct DestOrder {
  bool first;
  int pos;
  unsigned firsts;
};

__device__ __forceinline__ DestOrder dest_order(int dst, int K) {
  const int lane = lane_id();
  const unsigned same = __match_any_sync(0xffffffffu, dst);
  DestOrder o;
  o.first = lane < K && dst >= 0 && __ffs(same) - 1 == lane;
  o.firsts = __ballot_sync(0xffffffffu, o.first);
  o.pos = 0;
  for (unsigned m = o.firsts; m != 0; m &= m - 1) {
    const int d = __shfl_sync(0xffffffffu, dst, __ffs(m) - 1);
    if (o.first && d < dst) ++o.pos;
  }
  return o;
}

// cins[d] (rank d's combine input in place, or -1) and this rank's copy of it (cins_seen)
__device__ __forceinline__ long long* cins_of(const CombineParams& p, int rank) {
  return reinterpret_cast<long long*>(peer_ptr(p.comm, rank) + p.cins_off);
}

// Lane d < R: where rank d's combine input may be read in place (-1: it pushed its partials),
// from this rank's copy made behind the push's first barrier.
__device__ __forceinline__ long long in_place_of_lane(const CombineParams& p) {
  const int lane = lane_id();
  return p.zero_copy && lane < p.comm.num_ranks ? __ldcg(cins_of(p, p.comm.rank) + kMaxRanks + lane)
                                                : -1;
}

// Token t's send part of the handle: its number of destination ranks, and on lane k < K slot
// k's destination rank and row there (-1 on the other lanes and for dropped slots).
struct SendSlots {
  int n, dst, row;
};

__device__ __forceinline__ SendSlots send_slots(const CombineParams& p, int t) {
  const int* srow = handle_row(p.handle, t, p.W);
  const int lane = lane_id();
  SendSlots s{srow[handle::kSendNumDst], -1, -1};
  if (lane < p.K) {
    s.dst = srow[handle::kSendDstRank + lane];
    s.row = srow[handle::send_dst_row(p.K) + lane];
  }
  return s;
}

// kBulk: rows that travel as is go by bulk copies (its own instantiation, so the default one
// keeps its registers).
template <typename T, int V, bool kBulk>
__global__ void __launch_bounds__(512) combine_push_kernel(CombineParams p) {
  pdl_wait();
  pdl_trigger();
  // the previous reduce finished before this grid (every kernel waits for its predecessor);
  // this combine's reduce takes tickets after waiting for this grid
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.reduce_ticket = 0u;
  const int R = p.comm.num_ranks;
  // Where this rank's x may be read in place, to every peer before the barrier (every CTA
  // writes the same value, so CTA b of a peer sees its partner's). The peers' reduces of the
  // last combine are done with cins: they copied it behind that combine's first barrier.
  const bool publish = p.zero_copy && threadIdx.x < R;
  if (publish) cins_of(p, threadIdx.x)[p.comm.rank] = p.x_in_place;
  cta_barrier(p.comm, blockIdx.x, kOpCombinePush);
  if (publish) cins_of(p, p.comm.rank)[kMaxRanks + threadIdx.x] = __ldcg(cins_of(p, p.comm.rank) + threadIdx.x);
  if (p.x_in_place >= 0) {  // the sources read this rank's rows themselves
    cta_barrier(p.comm, blockIdx.x, kOpCombinePush);
    return;
  }
  extern __shared__ __align__(128) char push_rows[];  // bulk rows: one buffer per warp
  __shared__ unsigned long long row_loaded[kBulkWarps];
  WarpBulkFanout fan{smem_u32(push_rows) + static_cast<unsigned>(warp_id() * p.bulk_row_bytes),
                     smem_u32(&row_loaded[warp_id()]), 0u};
#if DEEP_EP_OPS_HAS_BULK_COPY
  if (kBulk && lane_id() == 0) mbar_init_single(fan.bar);
#endif
  __syncwarp();
  constexpr int U = chunk_vecs<V>();
  const int W = p.W, K = p.K, me = p.comm.rank;
  const int G = p.handle[handle::kHdrValidGroups];
  const bool expand = p.handle[handle::kHdrExpand] != 0;
  // Rows travel as is when the partial is exactly the row: no weights and one member per
  // group (compact layout). The handle header says which layout made it.
  const bool raw = p.stage_raw && !expand;
  const int64_t slot_bytes = static_cast<int64_t>(p.Wd) * (raw ? sizeof(T) : sizeof(float));
  const int* recv = handle_row(p.handle, p.T, W);
  const T* x = static_cast<const T*>(p.x);
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  for (int g = blockIdx.x * warps + warp_id(); g < G; g += gridDim.x * warps) {
    const int* hrow = recv + static_cast<int64_t>(g) * W;
    const int src = hrow[handle::kGroupSrcRank];
    if (src == me) continue;  // this rank's own tokens: the reduce reads x directly
    const int tok = hrow[handle::kGroupSrcToken], cslot = hrow[handle::kGroupCombineSlot];
    char* dst = peer_ptr(p.comm, src) + p.stage_off +
                (static_cast<int64_t>(tok) * p.num_slots + cslot) * slot_bytes;
    if (raw) {  // compact, no weights: the partial is the row itself
      const T* row = x + static_cast<int64_t>(hrow[handle::kGroupMember]) * p.Wd;
      if (kBulk &&
          ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(row)) & 15u) == 0) {
        fan.load(reinterpret_cast<const char*>(row), static_cast<unsigned>(slot_bytes), nullptr, 0);
        fan.store(1u, dst, static_cast<unsigned>(slot_bytes), nullptr, 0, p.comm.wait.timeout_ns);
      } else {
        warp_copy(dst, row, slot_bytes);
      }
      continue;
    }
    // members (ascending, -1 padded) straight to lanes
    const int mrow = lane < K ? hrow[handle::kGroupMember + lane] : -1;
    const int nm = expand ? __popc(__ballot_sync(0xffffffffu, mrow >= 0)) : 1;
    const float mw = (p.weights != nullptr && lane < nm) ? p.weights[mrow] : 1.f;
    float* out = reinterpret_cast<float*>(dst);
    for (int64_t c0 = 0; c0 < p.Wd; c0 += kWarp * V * U) {
      float acc[U][V];
      group_partial<T, V, U>(x, p.Wd, c0, nm, mrow, mw, p.weights != nullptr, acc);
      store_chunk<float, V, U>(out, c0, p.Wd, acc);
    }
  }
  if constexpr (kBulk) fan.drain();
  cta_barrier(p.comm, blockIdx.x, kOpCombinePush);
}

// Partials staged as fp32 (weights, or the expert-major layout); compact rows without weights
// take combine_reduce_rows.
template <typename T, int V>
__device__ __forceinline__ void combine_reduce(const CombineParams& p, bool expand) {
  constexpr int U = chunk_vecs<V>();
  const float* win = reinterpret_cast<const float*>(peer_ptr(p.comm, p.comm.rank) + p.stage_off);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int me = p.comm.rank, K = p.K;
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  const int64_t Wd = p.Wd;
  const long long in_place = in_place_of_lane(p);
  const bool any_in_place = __any_sync(0xffffffffu, lane != me && in_place >= 0);
  for (int t = blockIdx.x * warps + warp_id(); t < p.T;
       t = warp_next_ticket(p.reduce_ticket, gridDim.x * warps)) {
    const SendSlots ss = send_slots(p, t);
    const int n = ss.n, dst = ss.dst, row = ss.row;
    const unsigned mine = __ballot_sync(0xffffffffu, lane < K && dst == me);
    // the token's destination ranks in rank order: needed for this rank's own slot (its place
    // there) and, with peers read in place, for the slot of each of theirs
    DestOrder o{false, -1, 0u};
    if (mine != 0 || any_in_place) o = dest_order(dst, K);
    int s_me = -1, nm = 0, mrow = -1;
    float mw = 1.f;
    if (mine != 0) {
      s_me = __popc(__ballot_sync(0xffffffffu, o.first && dst < me));
      nm = members_to_lanes(row, mine, expand, p.weights, &mrow, &mw);
    }
    const float* slot0 = win + static_cast<int64_t>(t) * p.num_slots * Wd;
    for (int64_t c0 = 0; c0 < Wd; c0 += kWarp * V * U) {
      float acc[U][V];
      if (n == 0) zero_chunk(acc);
      for (int s = 0; s < n; ++s) {
        float v[U][V];
        long long at = -1;
        int d = -1;
        if (any_in_place && s != s_me) {
          const unsigned holder = __ballot_sync(0xffffffffu, o.first && o.pos == s);
          d = __shfl_sync(0xffffffffu, dst, __ffs(holder) - 1);
          at = __shfl_sync(0xffffffffu, in_place, d);
        }
        if (s == s_me) {
          group_partial<T, V, U>(x, Wd, c0, nm, mrow, mw, p.weights != nullptr, v);
        } else if (at >= 0) {  // rank d's partial from its rows in place (it has no weights)
          const unsigned members = __ballot_sync(0xffffffffu, lane < K && dst == d);
          int drow;
          float dw;
          const int dn = members_to_lanes(row, members, expand, nullptr, &drow, &dw);
          const T* dx = reinterpret_cast<const T*>(peer_ptr(p.comm, d) + at);
          group_partial<T, V, U>(dx, Wd, c0, dn, drow, 1.f, false, v);
        } else {
          load_chunk<float, V, U>(slot0 + s * Wd, c0, Wd, v);
        }
        if (s == 0) {
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[u][i] = v[u][i];
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < V; ++i) acc[u][i] = __fadd_rn(acc[u][i], v[u][i]);
        }
      }
      store_chunk<T, V, U>(out + static_cast<int64_t>(t) * Wd, c0, Wd, acc);
    }
  }
}

// Compact layout without weights (the usual inference combine): every term of a token's sum is
// one row of T (its own row of x here, a peer's row in place, or a row the peer pushed as is).
// Lane s < n gets the address of term s of token t's sum (its n terms in rank order, which is
// the order of the sum and of the staging slots); returns n.
template <typename T>
__device__ __forceinline__ int token_terms(const CombineParams& p, int t, long long in_place,
                                           const T* win, const T** mine) {
  const int64_t Wd = p.Wd;
  const SendSlots ss = send_slots(p, t);
  const int dst = ss.dst, row = ss.row;
  // the first lane of each destination rank owns that rank's term
  const DestOrder o = dest_order(dst, p.K);
  const long long at = __shfl_sync(0xffffffffu, in_place, dst >= 0 ? dst : 0);
  const T* term = nullptr;
  if (o.first) {
    if (dst == p.comm.rank)
      term = static_cast<const T*>(p.x) + static_cast<int64_t>(row) * Wd;
    else if (at >= 0)  // rank dst's row in place (compact: every slot there names it)
      term = reinterpret_cast<const T*>(peer_ptr(p.comm, dst) + at) + static_cast<int64_t>(row) * Wd;
    else
      term = win + (static_cast<int64_t>(t) * p.num_slots + o.pos) * Wd;
  }
  *mine = nullptr;
  for (unsigned m = o.firsts; m != 0; m &= m - 1) {
    const int k = __ffs(m) - 1;
    const int s = __shfl_sync(0xffffffffu, o.pos, k);
    const T* ptr = reinterpret_cast<const T*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(term), k));
    if (lane_id() == s) *mine = ptr;
  }
  return ss.n;
}

// out_row = sum of the n rows held by lanes 0..n-1 (`mine`), in lane order. The warp loads the
// chunk of up to TF terms into registers before adding any of them, so the loads of a token's
// terms overlap. A token has at most min(R, K) terms: with two ranks TF = 2 terms of 1.5
// chunks each (twice the chunk spills registers), else TF = 4 of one chunk.
template <typename T, int V, int TF>
__device__ __forceinline__ void add_rows_in_registers(const T* mine, int n, T* out_row, int64_t Wd) {
  constexpr int U = TF == 2 ? chunk_vecs<V>() * 3 / 2 : chunk_vecs<V>();
  for (int64_t c0 = 0; c0 < Wd; c0 += kWarp * V * U) {
    float acc[U][V];
    if (n == 0) zero_chunk(acc);
    for (int b = 0; b < n; b += TF) {
      Pack<T, V> pk[TF][U];
#pragma unroll
      for (int j = 0; j < TF; ++j) {
        const T* r = reinterpret_cast<const T*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine), (b + j) & (kWarp - 1)));
        if (b + j < n) load_packs<T, V, U>(r, c0, Wd, pk[j]);
      }
#pragma unroll
      for (int j = 0; j < TF; ++j)
        if (b + j < n) add_term<T, V, U>(acc, pk[j], 1.f, false, b + j == 0);
    }
    store_chunk<T, V, U>(out_row, c0, Wd, acc);
  }
}

// The same sum for n <= TF terms of 16-byte vectors, staged through this warp's shared memory
// by cp.async (no registers held while the copies fly): UC vectors of every term per lane
// in flight, TF * UC * 512 bytes a warp. Each lane reads back only what it copied itself, so
// its own wait is the only ordering needed. More bytes in flight per warp than the register
// path holds (its loads are latency bound: bench/NOTES.md v10, v11); the default.
template <typename T, int V, int TF, int UC>
__device__ __forceinline__ void add_rows_via_smem(const T* mine, int n, T* out_row, int64_t Wd,
                                                  Pack<T, V>* stage) {
  static_assert(sizeof(Pack<T, V>) == 16, "cp.async stages 16-byte vectors");
  const int lane = lane_id();
  for (int64_t c0 = 0; c0 < Wd; c0 += kWarp * V * UC) {
    for (int j = 0; j < n; ++j) {
      const T* r = reinterpret_cast<const T*>(
          __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine), j));
#pragma unroll
      for (int u = 0; u < UC; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u * kWarp + lane) * V;
        if (c < Wd) cp_async_16(stage + (j * UC + u) * kWarp + lane, r + c);
      }
    }
    cp_async_wait_all();
#pragma unroll
    for (int u = 0; u < UC; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u * kWarp + lane) * V;
      if (c >= Wd) continue;
      // one vector per step: the chunk helpers with U = 1 (the same rounding as every path)
      float acc[1][V];
      if (n == 0) zero_chunk(acc);
      for (int j = 0; j < n; ++j) {
        const Pack<T, V> pk[1] = {stage[(j * UC + u) * kWarp + lane]};
        add_term<T, V, 1>(acc, pk, 1.f, false, j == 0);
      }
      store_from_f32<T, V>(out_row + c, acc[0]);
    }
  }
}

// Shared memory of the staged variant: kSmemTerms * kSmemVecs 16-byte vectors per lane.
constexpr int kSmemTerms = 4, kSmemVecs = 4;
static_assert(static_cast<size_t>(kSmemTerms) * kSmemVecs * kWarp * 16 * (512 / kWarp) ==
                  kCombineReduceSmemBytes,
              "the staged reduce's shared memory is what the host checks the device grants");

template <typename T, int V, int TF>
__device__ __forceinline__ void combine_reduce_rows(const CombineParams& p) {
  const T* win = reinterpret_cast<const T*>(peer_ptr(p.comm, p.comm.rank) + p.stage_off);
  T* out = static_cast<T*>(p.out);
  const int warps = blockDim.x / kWarp;
  const long long in_place = in_place_of_lane(p);
  extern __shared__ int4 reduce_smem[];
  for (int t = blockIdx.x * warps + warp_id(); t < p.T;
       t = warp_next_ticket(p.reduce_ticket, gridDim.x * warps)) {
    const T* mine;
    const int n = token_terms<T>(p, t, in_place, win, &mine);
    T* out_row = out + static_cast<int64_t>(t) * p.Wd;
    if constexpr (sizeof(Pack<T, V>) == 16) {
      // two ranks: at most two terms, each twice as many vectors in flight
      constexpr int kTerms = TF == 2 ? 2 : kSmemTerms, kVecs = kSmemTerms * kSmemVecs / kTerms;
      if (p.reduce_via_smem && n <= kTerms) {
        auto* stage = reinterpret_cast<Pack<T, V>*>(reduce_smem) +
                      static_cast<int64_t>(warp_id()) * kSmemTerms * kSmemVecs * kWarp;
        add_rows_via_smem<T, V, kTerms, kVecs>(mine, n, out_row, p.Wd, stage);
        continue;
      }
    }
    add_rows_in_registers<T, V, TF>(mine, n, out_row, p.Wd);
  }
}

// One rank: out[t] = the partial of t's group (its rows of x), or 0 for a token routed nowhere.
// One member (compact layout, every token here): 4 vectors per lane in flight; several
// (expert-major): 2 vectors of each of two members.
template <typename T, int V>
__global__ void __launch_bounds__(512) combine_local_kernel(CombineParams p) {
  pdl_wait();
  pdl_trigger();
  constexpr int U1 = 4, U2 = chunk_vecs<V>();
  const bool expand = p.handle[handle::kHdrExpand] != 0;
  const bool weighted = p.weights != nullptr;
  const T* x = static_cast<const T*>(p.x);
  const int me = p.comm.rank, K = p.K;
  const int warps = blockDim.x / kWarp;
  const int lane = lane_id();
  const int64_t Wd = p.Wd;
  // a fixed stride: no push kernel runs before this one to reset a ticket, and no peer waits
  // for a late CTA
  for (int t = blockIdx.x * warps + warp_id(); t < p.T; t += gridDim.x * warps) {
    const SendSlots ss = send_slots(p, t);
    const int dst = ss.dst, row = ss.row;
    const unsigned mine = __ballot_sync(0xffffffffu, lane < K && dst == me);
    int nm = 0, mrow = -1;
    float mw = 1.f;
    if (mine != 0) nm = members_to_lanes(row, mine, expand, p.weights, &mrow, &mw);
    T* out = static_cast<T*>(p.out) + static_cast<int64_t>(t) * Wd;
    if (nm <= 1) {
      const int64_t r = __shfl_sync(0xffffffffu, mrow, 0);
      const float w = __shfl_sync(0xffffffffu, mw, 0);
#pragma unroll 1
      for (int64_t c0 = 0; c0 < Wd; c0 += kWarp * V * U1) {
        float acc[U1][V];
        if (nm == 0) {
          zero_chunk(acc);
        } else {
          Pack<T, V> a[U1];
          load_packs<T, V, U1>(x + r * Wd, c0, Wd, a);
          add_term<T, V, U1>(acc, a, w, weighted, true);
        }
        store_chunk<T, V, U1>(out, c0, Wd, acc);
      }
    } else {
#pragma unroll 1
      for (int64_t c0 = 0; c0 < Wd; c0 += kWarp * V * U2) {
        float acc[U2][V];
        group_partial<T, V, U2>(x, Wd, c0, nm, mrow, mw, weighted, acc);
        store_chunk<T, V, U2>(out, c0, Wd, acc);
      }
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(512) combine_reduce_kernel(CombineParams p) {
  pdl_wait();
  pdl_trigger();
  const bool expand = p.handle[handle::kHdrExpand] != 0;
  if (!p.stage_raw || expand) {
    combine_reduce<T, V>(p, expand);
  } else if (p.comm.num_ranks == 2) {
    combine_reduce_rows<T, V, 2>(p);
  } else {
    combine_reduce_rows<T, V, 4>(p);
  }
}

template <typename T, int V>
cudaError_t launch_typed(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  // one rank: nothing crosses a window; one kernel reads x
  if (p.comm.num_ranks == 1) return launch_pdl(combine_local_kernel<T, V>, epi_ctas, 512, 0, stream, p);
  const int push_smem = p.bulk_row_bytes * kBulkWarps;
  cudaError_t err;
  if (push_smem > 0) {
    static const int room =
        raise_dynamic_smem_limit(reinterpret_cast<const void*>(combine_push_kernel<T, V, true>));
    if (push_smem > room) return cudaErrorInvalidValue;  // bulk_row_limit() promised too much
    err = launch_pdl(combine_push_kernel<T, V, true>, ctas, 512, push_smem, stream, p);
  } else {
    err = launch_pdl(combine_push_kernel<T, V, false>, ctas, 512, 0, stream, p);
  }
  if (err != cudaSuccess) return err;
  size_t smem = 0;
  if (p.reduce_via_smem) {
    static const int room =
        raise_dynamic_smem_limit(reinterpret_cast<const void*>(combine_reduce_kernel<T, V>));
    if (room < static_cast<int>(kCombineReduceSmemBytes)) return cudaErrorInvalidValue;
    smem = kCombineReduceSmemBytes;
  }
  return launch_pdl(combine_reduce_kernel<T, V>, epi_ctas, 512, smem, stream, p);
}

template <typename T>
cudaError_t launch_width(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  // Vector width: 16-byte accesses where the row width allows (rows start at multiples of
  // Wd elements, so Wd % V == 0 keeps every access aligned).
  constexpr int kWide = 16 / sizeof(T);
  if (p.Wd % kWide == 0) return launch_typed<T, kWide>(p, ctas, epi_ctas, stream);
  if (p.Wd % 2 == 0) return launch_typed<T, 2>(p, ctas, epi_ctas, stream);
  return launch_typed<T, 1>(p, ctas, epi_ctas, stream);
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, int ctas, int epi_ctas, cudaStream_t stream) {
  switch (p.dtype) {
    case 0: return launch_width<float>(p, ctas, epi_ctas, stream);
    case 1: return launch_width<__nv_bfloat16>(p, ctas, epi_ctas, stream);
    case 2: return launch_width<__half>(p, ctas, epi_ctas, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace deep_ep_ops
