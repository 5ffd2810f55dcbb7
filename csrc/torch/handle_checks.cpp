// The checks themselves, and which header column holds which fact, are rendered from
// deep_ep_ops/check_rules.py (generated/ep_checks.hpp); here: where the facts come from.
// Messages built with std::to_string and raised through value_error (py_text.hpp says why no
// stream formats them).
#include "handle_checks.hpp"

#include <ATen/ATen.h>

#include <string>

#include "check_text.hpp"  // py_tuple
#include "generated/ep_checks.hpp"  // rendered from deep_ep_ops/check_rules.py (codegen)
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
    value_error(std::string("deep_ep.") + op_name(use) + ": handle must be an int32 [1 + T + V + C, W] "
                "handle with a header row of at least " + std::to_string(handle::kNumHeaderFields) +
                " columns; got shape " + (handle.defined() ? checks::py_tuple(handle.sizes()) : "None"));
  // Only row 0 crosses to the host; contiguous so the pointer walks one row of int32.
  const at::Tensor row = handle.narrow(0, 0, 1).to(at::kCPU).contiguous();
  return checks::handle_facts_of(row.const_data_ptr<int32_t>());
}

void check_handle_facts(HandleUse use, const HandleFacts& made, const BufferIdentity& buf,
                        int64_t x_rows) {
  if (use == HandleUse::combine)
    checks::combine_handle(made, buf, x_rows);
  else
    checks::cached_dispatch_handle(made, buf, x_rows);
}

}  // namespace deep_ep_ops
