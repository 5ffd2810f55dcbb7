// Column layout of the int32 routing handle [1 + T + C, W]. Mirrors deep_ep_ops/handle.py,
// which documents every field; tests/test_handle_layout.py checks the two agree.
#pragma once

// Usable from device code and from host-only C++ (no CUDA headers needed there).
#include "../device/shared_types.hpp"  // DEO_HOST_DEVICE

namespace deep_ep_ops {
namespace handle {

constexpr int kHeaderRows = 1;

// header (row 0)
constexpr int kHdrValidRows = 0;
constexpr int kHdrValidGroups = 1;
constexpr int kHdrNumTokens = 2;
constexpr int kHdrNumRanks = 3;
constexpr int kHdrNumExperts = 4;
constexpr int kHdrMaxTokens = 5;
constexpr int kHdrExpand = 6;
constexpr int kHdrAlignment = 7;
constexpr int kHdrTopk = 8;
constexpr int kHdrBufferId = 9;
constexpr int kHdrNumRows = 10;
constexpr int kNumHeaderFields = 11;

// send part (rows 1 .. T)
constexpr int kSendNumDst = 0;
constexpr int kSendDstRank = 1;  // + k
DEO_HOST_DEVICE constexpr int send_dst_row(int num_topk) { return kSendDstRank + num_topk; }

// rail send part of a multi-host handle (rows 1 .. T; virtual part V = N*M rows follows it)
constexpr int kRailNumHosts = 0;
constexpr int kRailDstHost = 1;  // + k
DEO_HOST_DEVICE constexpr int rail_dst_slot(int num_topk) { return kRailDstHost + num_topk; }

// receive part, per row
constexpr int kRecvSrcRank = 0;
constexpr int kRecvSrcToken = 1;
constexpr int kRecvTopkSlot = 2;
constexpr int kRecvGroup = 3;
// receive part, per group
constexpr int kGroupSrcRank = 4;
constexpr int kGroupSrcToken = 5;
constexpr int kGroupCombineSlot = 6;
constexpr int kGroupMember = 7;  // + i

DEO_HOST_DEVICE constexpr int handle_width(int num_topk) {
  const int send = 1 + 2 * num_topk, recv = kGroupMember + num_topk;
  const int wide = send > recv ? send : recv;
  return wide > kNumHeaderFields ? wide : kNumHeaderFields;
}

}  // namespace handle
}  // namespace deep_ep_ops
