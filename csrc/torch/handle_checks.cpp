// Messages built with std::to_string and raised through value_error (py_text.hpp says why no
// stream formats them).
#include "handle_checks.hpp"

#include <ATen/ATen.h>

#include <string>

#include "check_text.hpp"  // py_tuple
#include "generated/handle_layout.hpp"  // rendered from deep_ep_ops/handle.py (codegen)
#include "py_text.hpp"

namespace deep_ep_ops {
namespace {

const char* op_name(HandleUse use) {
  return use == HandleUse::combine ? "combine" : "cached_dispatch";
}

}  // namespace

HandleFacts read_handle_header(HandleUse use, const at::Tensor& handle) {
  // The callers' shape check (check_handle) already guarantees this; checked again here
  // because the reads below index the row blindly.
  if (!handle.defined() || handle.dim() != 2 || handle.size(0) < handle::kHeaderRows ||
      handle.size(1) < handle::kNumHeaderFields || handle.scalar_type() != at::kInt)
    value_error(std::string("deep_ep.") + op_name(use) + ": handle must be an int32 [1 + T + C, W] "
                "handle with a header row of at least " + std::to_string(handle::kNumHeaderFields) +
                " columns; got shape " + (handle.defined() ? checks::py_tuple(handle.sizes()) : "None"));
  // Only row 0 crosses to the host; contiguous so the pointer walks one row of int32.
  const at::Tensor row = handle.narrow(0, 0, 1).to(at::kCPU).contiguous();
  const int32_t* v = row.const_data_ptr<int32_t>();
  return HandleFacts{v[handle::kHdrBufferId], v[handle::kHdrNumRanks], v[handle::kHdrTopk],
                     v[handle::kHdrNumTokens], v[handle::kHdrNumRows]};
}

void check_handle_facts(HandleUse use, const HandleFacts& made, const BufferIdentity& buf,
                        int64_t x_rows) {
  const std::string op = std::string("deep_ep.") + op_name(use) + ": ";
  if (made.buffer_id != buf.buffer_id)
    value_error(op + "handle belongs to another Buffer: it was made by a dispatch on Buffer #" +
                std::to_string(made.buffer_id) + ", and group " + py_repr(buf.group) +
                " has Buffer #" + std::to_string(buf.buffer_id) +
                " (a handle of another group, or of a Buffer destroyed since)");
  if (made.num_ranks != buf.num_ranks || made.topk != buf.topk)
    value_error(op + "handle does not match the Buffer: it was made for R=" +
                std::to_string(made.num_ranks) + " ranks and K=" + std::to_string(made.topk) +
                ", the Buffer has R=" + std::to_string(buf.num_ranks) + ", K=" +
                std::to_string(buf.topk));
  if (use == HandleUse::combine) {
    if (x_rows != made.num_rows)
      value_error(op + "x has " + std::to_string(x_rows) +
                  " rows, the handle's dispatch produced " + std::to_string(made.num_rows));
  } else if (x_rows != made.num_tokens) {
    value_error(op + "x has " + std::to_string(x_rows) + " rows, the handle's dispatch had " +
                std::to_string(made.num_tokens) + " tokens");
  }
}

}  // namespace deep_ep_ops
