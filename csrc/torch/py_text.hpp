// Python-facing error text of the C++ kernels: Python's repr of a string, and the one way they
// raise a ValueError. Torch-only (also built without CUDA, tests/test_handle_records_cpu.py).
//
// value_error() takes the finished message: callers build it from std::string pieces and
// std::to_string, never through TORCH_CHECK's variadic arguments. Those go through c10::str,
// an std::ostringstream, and formatting an integer there (the num_put facet of the stream's
// locale) is what crashed the extension on the GPU image (torch 2.11+cu130, g++ 13.3): the
// string-only messages raised fine, the first one with an int in it (the handle header check)
// took the process down with a segfault. With one std::string argument c10::str returns it
// as is, so no stream is made at all.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace deep_ep_ops {

// repr(s) of a Python str (the quoting Python picks for plain ASCII text).
inline std::string py_repr(c10::string_view s) {
  const bool dq = s.find('\'') != c10::string_view::npos && s.find('"') == c10::string_view::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == '\\' || c == q) out += '\\';
    out += c;
  }
  return out + q;
}

// Raise ValueError(msg) in Python (c10::ValueError).
[[noreturn]] inline void value_error(const std::string& msg) {
  C10_THROW_ERROR(ValueError, msg);
}

}  // namespace deep_ep_ops
