// The handle-header checks of combine and cached_dispatch (check_rules.py's <OP>_HANDLE,
// rendered into generated/ep_checks.hpp; Python runs them in validation.check_handle_header):
// the handle was made on the call's Buffer, and x has the rows its dispatch implies. The facts
// come from handle_records.hpp (no sync) or, for a handle without a record, from reading its
// header row (a device-to-host copy; only with DEEP_EP_OPS_VALIDATE=1).
// Torch-only: also built without CUDA (tests/test_handle_records_cpu.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace deep_ep_ops {

// What a dispatch stamped into a handle's header that combine / cached_dispatch check (the
// columns: check_rules.HEADER_FIELDS, rendered as checks::handle_facts_of).
struct HandleFacts {
  int64_t buffer_id;
  int64_t num_ranks;   // R
  int64_t topk;        // K
  int64_t num_tokens;  // T: rows of the dispatch's x (cached_dispatch's x)
  int64_t num_rows;    // C: rows of the dispatch's outputs (combine's x)
};

// Which op checks: combine takes the dispatch's C rows, cached_dispatch its T tokens.
enum class HandleUse { combine, cached_dispatch };

// The Buffer a call runs on, as the checks see it (check_rules.py: BUFFER_ID, NUM_RANKS,
// OWN_TOPK and the group).
struct BufferIdentity {
  int64_t buffer_id;
  int64_t num_ranks;  // R
  int64_t topk;       // K
  c10::string_view group;
};

// The facts in `handle`'s header row. Copies that row to the host (a sync for a CUDA handle).
// ValueError when the handle has no header row to read (fewer than 1 row or
// kNumHeaderFields columns, or not int32).
HandleFacts read_handle_header(HandleUse use, const at::Tensor& handle);

// ValueError unless a handle carrying `made` belongs to `buf` and fits an x of `x_rows` rows.
void check_handle_facts(HandleUse use, const HandleFacts& made, const BufferIdentity& buf,
                        int64_t x_rows);

}  // namespace deep_ep_ops
