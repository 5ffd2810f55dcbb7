// Writers of the routing handle's rows (columns: handle_layout.hpp), shared by every dispatch
// kernel, so that each field is written by one piece of code.
#pragma once

#include "common.cuh"

namespace deep_ep_ops {
namespace dev {

struct HandleHeader {
  int valid_rows, valid_groups, num_tokens, num_ranks, num_experts, max_tokens, expand,
      alignment, topk;
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

// Receive row `group` of the compact layout (row and group coincide): source rank and token,
// the group itself as its row and only member, the combine slot; other columns -1.
__device__ __forceinline__ void warp_write_compact_recv_row(int* grow, int W, int src, int tok,
                                                            int group, int cslot) {
  for (int c = lane_id(); c < W; c += kWarp) {
    int v = -1;
    if (c == handle::kRecvSrcRank || c == handle::kGroupSrcRank) v = src;
    else if (c == handle::kRecvSrcToken || c == handle::kGroupSrcToken) v = tok;
    else if (c == handle::kRecvGroup || c == handle::kGroupMember) v = group;
    else if (c == handle::kGroupCombineSlot) v = cslot;
    grow[c] = v;
  }
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

}  // namespace dev
}  // namespace deep_ep_ops
