// Writers of the routing handle's rows (columns: generated/handle_layout.hpp), shared by every
// dispatch kernel, so that each field is written by one piece of code.
#pragma once

#include "../device/common.cuh"

namespace deep_ep_ops {
namespace dev {

struct HandleHeader {
  int valid_rows, valid_groups, num_tokens, num_ranks, num_experts, max_tokens, expand,
      alignment, topk, buffer_id, num_rows;
};

// Header row (row 0); one thread.
__device__ __forceinline__ void write_header_row(int* h, int W, const HandleHeader& v) {
  for (int c = 0; c < W; ++c) h[c] = 0;
  h[handle::kHdrValidRows] = v.valid_rows;
  h[handle::kHdrValidGroups] = v.valid_groups;
  h[handle::kHdrNumTokens] = v.num_tokens;
  h[handle::kHdrNumRanks] = v.num_ranks;
  h[handle::kHdrNumExperts] = v.num_experts;
  h[handle::kHdrMaxTokens] = v.max_tokens;
  h[handle::kHdrExpand] = v.expand;
  h[handle::kHdrAlignment] = v.alignment;
  h[handle::kHdrTopk] = v.topk;
  h[handle::kHdrBufferId] = v.buffer_id;
  h[handle::kHdrNumRows] = v.num_rows;
}

// Send row of one token: [#destinations, rank of slot k (K), row of slot k (K), -1...].
// Lane k < K holds slot k's destination rank `dst` (-1: none) and its row there `row`.
// The whole warp calls it.
__device__ __forceinline__ void warp_write_send_row(int* hrow, int W, int K, int num_dst,
                                                    int dst, int row) {
  for (int c0 = 0; c0 < W; c0 += kWarp) {  // warp-uniform trip count: the shuffles converge
    const int c = c0 + lane_id();
    const int k1 = c - handle::kSendDstRank, k2 = c - handle::send_dst_row(K);
    const int v1 = __shfl_sync(0xffffffffu, dst, k1 & (kWarp - 1));
    const int v2 = __shfl_sync(0xffffffffu, row, k2 & (kWarp - 1));
    int v = -1;
    if (c == handle::kSendNumDst) v = num_dst;
    else if (k1 >= 0 && k1 < K) v = v1;
    else if (k2 >= 0 && k2 < K) v = v2;
    if (c < W) hrow[c] = v;
  }
}

// The same send row by one thread that holds every slot (the count blocks' routing rows,
// block_routing.cuh): dst[k] / row[k] for k < K. The send part's columns are [#destinations,
// K ranks, K rows], then -1.
template <int KMAX>
__device__ __forceinline__ void thread_write_send_row(int* hrow, int W, int K, int num_dst,
                                                      const int (&dst)[KMAX], const int (&row)[KMAX]) {
  static_assert(handle::kSendNumDst == 0 && handle::kSendDstRank == 1, "send part layout");
  hrow[handle::kSendNumDst] = num_dst;
#pragma unroll
  for (int k = 0; k < KMAX; ++k)
    if (k < K) {
      hrow[handle::kSendDstRank + k] = dst[k];
      hrow[handle::send_dst_row(K) + k] = row[k];
    }
  for (int c = handle::send_dst_row(K) + K; c < W; ++c) hrow[c] = -1;
}

// Column c of receive row `group` of the compact layout (row and group coincide): source rank
// and token, the group itself as its row and only member, the combine slot; other columns -1.
__device__ __forceinline__ int compact_recv_col(int c, int src, int tok, int group, int cslot) {
  if (c == handle::kRecvSrcRank || c == handle::kGroupSrcRank) return src;
  if (c == handle::kRecvSrcToken || c == handle::kGroupSrcToken) return tok;
  if (c == handle::kRecvGroup || c == handle::kGroupMember) return group;
  if (c == handle::kGroupCombineSlot) return cslot;
  return -1;
}

// That row by the whole warp, and by one thread.
__device__ __forceinline__ void warp_write_compact_recv_row(int* grow, int W, int src, int tok,
                                                            int group, int cslot) {
  for (int c = lane_id(); c < W; c += kWarp) grow[c] = compact_recv_col(c, src, tok, group, cslot);
}
__device__ __forceinline__ void thread_write_compact_recv_row(int* grow, int W, int src, int tok,
                                                              int group, int cslot) {
  for (int c = 0; c < W; ++c) grow[c] = compact_recv_col(c, src, tok, group, cslot);
}

// Group columns of an expert-major receive row: source rank and token, the combine slot, the
// member columns -1 (the members then write their rows into them).
__device__ __forceinline__ void warp_write_group_cols(int* grow, int W, int src, int tok,
                                                      int cslot) {
  for (int c = handle::kGroupSrcRank + lane_id(); c < W; c += kWarp) {
    int v = -1;
    if (c == handle::kGroupSrcRank) v = src;
    else if (c == handle::kGroupSrcToken) v = tok;
    else if (c == handle::kGroupCombineSlot) v = cslot;
    grow[c] = v;
  }
}

// Expert-major receive rows of one group (the token in compact row `group`): the group columns,
// then each lane k with a local expert j >= 0 writes its expert-major row `erow` into the group's
// member columns (members in ascending expert order, as the blocks are), its topk idx and
// weight, and that row's receive columns. The whole warp calls it.
__device__ __forceinline__ void warp_write_expand_group(int* recv_h, int W, int K, int group,
                                                        int src, int tok, int cslot, int j,
                                                        int erow, float wgt, int* recv_idx,
                                                        float* recv_w) {
  int members_before = 0;  // members with a smaller expert id than mine
  for (int k = 0; k < K; ++k) {
    const int jk = __shfl_sync(0xffffffffu, j, k);
    if (jk >= 0 && j >= 0 && jk < j) ++members_before;
  }
  int* grow = recv_h + static_cast<int64_t>(group) * W;
  warp_write_group_cols(grow, W, src, tok, cslot);
  __syncwarp();
  if (j >= 0) {
    grow[handle::kGroupMember + members_before] = erow;
    recv_idx[erow] = j;
    recv_w[erow] = wgt;
    int* rrow = recv_h + static_cast<int64_t>(erow) * W;
    rrow[handle::kRecvSrcRank] = src;
    rrow[handle::kRecvSrcToken] = tok;
    rrow[handle::kRecvTopkSlot] = lane_id();
    rrow[handle::kRecvGroup] = group;
  }
}

}  // namespace dev
}  // namespace deep_ep_ops
