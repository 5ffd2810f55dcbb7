// The error record of a Buffer's state as Python sees it: None, or a dict of its fields plus
// the message (host/error_record.hpp's words).
#pragma once

#include <torch/extension.h>

#include "../host/error_record.hpp"

namespace deep_ep_ops {

inline pybind11::object error_dict(const ErrorRecord* record) {
  const ErrorRecord e = read_error_record(record);
  if (e.code == 0) return pybind11::none();
  pybind11::dict d;
  d["code"] = e.code;
  d["rank"] = e.rank;
  d["peer"] = e.peer;
  d["slot"] = e.slot;
  d["expected"] = e.expected;
  d["seen"] = e.seen;
  d["op"] = e.op;
  d["where"] = wait_site_text(e.op);
  d["message"] = describe_failure(e);
  return d;
}

}  // namespace deep_ep_ops
